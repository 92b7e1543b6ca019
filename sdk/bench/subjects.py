"""What is timed, inside a worker process: one engine on one folder through the Engine
interface (native, native-lowmem, ort, torch, llama.cpp-py), or the user's path
(`generate`: Model.generate on the native engine with sampling, repetition penalty, stop strings
and streaming detokenization)."""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .probes import folder_facts

CACHE = Path(os.environ.get("EDGEACT_HOME", Path.home() / ".cache" / "edgeact")) / "bench"
# the settings `generate` is timed with: every step of the user's path does its work
GENERATE_SETTINGS = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 0,
                     "stop": ["\n\n\n\n", "<|never|>"]}


def llamacpp_gguf(folder: Path, meta: dict, ftype: str = "q4_0", progress=print) -> Path | None:
    """Our reader's weights written as GGUF f16 and quantized by llama.cpp itself (llama-quantize
    when built, else the Python binding); cached. None when the source weights are gone."""
    from edgeact.engines.baselines import source_of

    key = f"{Path(meta.get('source', {}).get('path', folder.name)).name}-{meta['config']['num_layers']}L-" \
          f"{meta['config']['hidden_size']}-{meta.get('source', {}).get('seed', 0)}"
    out = CACHE / f"{key.replace(':', '_')}.{ftype}.gguf"
    if out.exists():
        return out
    src = source_of(folder, meta)
    if src is None:
        return None
    import subprocess

    from edgeact.bench import llamabench
    from edgeact.converters.gguf_export import quantize_gguf, write_gguf
    from edgeact.extras import require

    require("gguf", "the GGUF for llama.cpp")  # before saying it is written
    progress(f"writing {out.name} for llama.cpp (once) ...")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        f16 = write_gguf(src, Path(tmp) / "model.f16.gguf", dtype="f16")
        quant = llamabench.quantize_binary()
        if quant is not None:
            proc = subprocess.run([str(quant), str(f16), str(Path(tmp) / out.name), ftype.upper()],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"llama-quantize failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        else:
            quantize_gguf(f16, Path(tmp) / out.name, ftype)
        os.replace(Path(tmp) / out.name, out)
    return out


def peak_rss() -> int:
    """Peak resident set of this process. VmHWM, not ru_maxrss: the latter survives
    execve, so a worker would inherit its parent's (torch-sized) high-water mark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def decode_sparsity(eng, tg: int, vocab: int) -> tuple[dict[str, float], dict[str, float]]:
    """Share of zeroed inputs per sparse site type (attn_in, attn_out, ffn_in, ffn_out,
    ffn_act) over `tg` decode steps, from the native profiler's Sparsify and NeuronMask records;
    and per projection behind them (q, k, v, o, gate, up, down), the share of decode calls that
    ran the input-sparse GEMV rather than the dense one on the masked input (the runtime times
    both and takes the faster)."""
    ids = np.random.default_rng(1).integers(3, vocab, size=tg + 1, dtype=np.int64)
    eng.reset()
    eng.forward(ids[:1], logits="last")
    eng.profile(True)
    eng.profile_reset()
    try:
        for t in ids[1:]:
            eng.forward(np.array([t]), logits="last")
        recs = eng.profile_records()
    finally:
        eng.profile(False)
        eng.reset()
    agg: dict[str, list[int]] = {}
    paths: dict[str, list[int]] = {}
    for r in recs:
        if r.get("sparse_eligible"):
            kind = r["name"].rsplit(".", 1)[-1].removesuffix("_proj")
            a = paths.setdefault(kind, [0, 0])
            a[0] += r["sparse_calls"]
            a[1] += r["sparse_eligible"]
        if r["op_type"] in ("Sparsify", "NeuronMask") and r["total"]:
            # a CoreInfer NeuronMask zeroes down_proj's input: the ffn_out site
            kind = ("ffn_out" if r["op_type"] == "NeuronMask"
                    else r["name"].rsplit(".sparsify", 1)[0].rsplit(".", 1)[-1])
            a = agg.setdefault(kind, [0, 0])
            a[0] += r["active"]
            a[1] += r["total"]
    return ({k: 1.0 - a / t for k, (a, t) in sorted(agg.items())},
            {k: s / n for k, (s, n) in paths.items()})


class Subject:
    """One engine on one folder: loaded and warmed up, then timed one repetition at a time (pp
    then tg, as llama-bench: pp asks for the last row's logits only, tg runs single-token steps
    after one untimed token), then finished with what needs the engine itself (realized
    sparsity, repack size, kernel set) and the process's peak RSS."""

    def __init__(self, spec: dict):
        from edgeact.engines import make_engine

        engine, folder, threads = spec["engine"], Path(spec["folder"]), spec["threads"]
        self.engine, self.pp, self.tg = engine, spec["pp"], spec["tg"]
        facts = folder_facts(folder)
        self.vocab = facts["vocab_size"]
        self.ids = np.random.default_rng(0).integers(3, self.vocab, size=max(self.pp, self.tg) + 1, dtype=np.int64)
        n_ctx = self.pp + self.tg + 8
        self.model = None
        if engine in ("native", "native-lowmem"):
            # the native KV cache is allocated up front: size it to the run, as llama.cpp's n_ctx is
            self.eng = make_engine(folder, "native", threads=threads, n_ctx=n_ctx, low_memory=engine == "native-lowmem")
        elif engine == "generate":
            import edgeact

            self.model = edgeact.load(folder, engine="native", threads=threads, n_ctx=n_ctx)
            # end of sequence would cut a sampled run short: every run makes tg tokens
            self.model.eos_token_ids = set()
            self.eng = self.model.engine
        elif engine == "ort":
            self.eng = make_engine(folder, "ort", threads=threads)
        elif engine == "torch":
            self.eng = make_engine(folder, "torch", threads=threads)
        elif engine == "llama.cpp-py":
            self.eng = make_engine(folder, "llama.cpp-py", threads=threads, gguf=spec["gguf"], n_ctx=max(n_ctx, 64))
        else:
            raise ValueError(f"unknown engine {engine!r}")
        # warm-up: page the weights in, size the buffers
        self._pp(self.ids[:min(self.pp, 16) or 1])
        self._tg(2)
        self.eng.reset()

    def _pp(self, ids) -> float:
        """Seconds for one prompt pass from an empty cache."""
        self.eng.reset()
        if self.model is not None:
            res = self.model.generate(ids, max_new_tokens=1, **GENERATE_SETTINGS)
            return res.prefill_s
        t0 = time.perf_counter()
        self.eng.forward(ids, logits="last")
        return time.perf_counter() - t0

    def _tg(self, n: int) -> float:
        """Seconds for n single-token steps after one untimed token."""
        self.eng.reset()
        if self.model is not None:
            res = self.model.generate(self.ids[:1], max_new_tokens=n + 1, **GENERATE_SETTINGS)
            if len(res.ids) != n + 1:
                raise RuntimeError(f"generate made {len(res.ids)} tokens, not {n + 1} ({res.finish_reason})")
            return res.decode_s
        self.eng.forward(self.ids[:1], logits="last")
        t0 = time.perf_counter()
        for t in self.ids[1:n + 1]:
            self.eng.forward(np.array([t]), logits="last")
        return time.perf_counter() - t0

    def rep(self) -> dict:
        """One repetition: {'pp': t/s or None, 'tg': t/s or None, 'at': wall-clock start}."""
        out = {"pp": None, "tg": None, "at": time.time()}
        if self.pp:
            out["pp"] = self.pp / self._pp(self.ids[:self.pp])
        if self.tg:
            out["tg"] = self.tg / self._tg(self.tg)
        return out

    def finish(self, extras: bool = True) -> dict:
        res = {}
        if extras:
            eng = self.eng
            if self.engine == "native" and eng.meta.get("sparsity") and self.tg:
                res["realized_sparsity"], res["sparse_path_share"] = decode_sparsity(eng, self.tg, self.vocab)
            if self.engine in ("native", "native-lowmem", "generate"):
                res["repacked_bytes"] = int(getattr(eng, "repacked_bytes", 0) or 0)
                res["isa"] = eng.isa
        res["peak_rss"] = peak_rss()
        return res


def worker(spec: dict) -> dict:
    """spec['reps'] repetitions of one engine back to back, then its extras when spec['extras']."""
    s = Subject(spec)
    reps = [s.rep() for _ in range(spec["reps"])]
    return {"pp": [r["pp"] for r in reps if r["pp"] is not None],
            "tg": [r["tg"] for r in reps if r["tg"] is not None], "rep_at": [r["at"] for r in reps],
            **s.finish(spec.get("extras", True))}


REPLY_TAG = "\x1eedgeact-bench "   # marks the worker's reply; any other output is not one


def reply_line(obj) -> str:
    return REPLY_TAG + json.dumps(obj) + "\n"


def parse_reply(text: str) -> dict | None:
    """The worker's reply in its stdout, or None. Split on newlines only: str.splitlines would
    also cut at the tag's \\x1e."""
    for line in reversed(text.split("\n")):
        at = line.find(REPLY_TAG)
        if at >= 0:
            try:
                return json.loads(line[at + len(REPLY_TAG):])
            except json.JSONDecodeError:
                pass
    return None


def serve_one(spec: dict) -> None:
    """The worker's entry: its own stdout for the reply; whatever else writes to fd 1 (a library,
    C stdio) goes to stderr, so it cannot be taken for the reply."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(reply_line(worker(spec)))
    out.flush()
