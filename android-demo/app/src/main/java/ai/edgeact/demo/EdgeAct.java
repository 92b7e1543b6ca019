package ai.edgeact.demo;

/** A model folder (written by `edgeact convert`) run by the native runtime; token ids in, logits out. */
public final class EdgeAct implements AutoCloseable {
    static { System.loadLibrary("edgeact_jni"); }

    private long handle;

    public EdgeAct(String modelDir, int threads) { handle = nativeOpen(modelDir, threads); }

    /** Appends ids to the context and returns the next-token logits. */
    public float[] forward(long[] ids) { return nativeForward(handle, ids); }

    /** Greedy continuation of ids, n tokens. */
    public long[] generate(long[] ids, int n) {
        nativeReset(handle);
        long[] out = new long[n];
        float[] logits = forward(ids);
        for (int i = 0; i < n; i++) {
            int best = 0;
            for (int v = 1; v < logits.length; v++) if (logits[v] > logits[best]) best = v;
            out[i] = best;
            if (i + 1 < n) logits = forward(new long[] {best});
        }
        return out;
    }

    @Override public void close() { nativeClose(handle); handle = 0; }

    private static native long nativeOpen(String dir, int threads);
    private static native float[] nativeForward(long handle, long[] ids);
    private static native void nativeReset(long handle);
    private static native void nativeClose(long handle);
}
