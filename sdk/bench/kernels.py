"""`edgeact bench --kernels`: the int4 matmul alone, ours against onnxruntime's MatMulNBits."""
from __future__ import annotations

import tempfile
import time

import numpy as np

from .probes import physical_cores, read_bandwidth
from .race import stats

def _ort_matmulnbits_session(mats, K: int, N: int, block: int, threads: int):
    """One onnxruntime session running every weight set once on the same input,
    so its time per matrix includes streaming that matrix from memory."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, qw in enumerate(mats):
        names = [f"B{i}", f"s{i}"] + ([f"z{i}"] if qw.zero_points is not None else [])
        nodes.append(helper.make_node("MatMulNBits", ["x"] + names, [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=4))
        inits += [numpy_helper.from_array(qw.B, names[0]), numpy_helper.from_array(qw.scales, names[1])]
        if qw.zero_points is not None:
            inits.append(numpy_helper.from_array(qw.zero_points, names[2]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        onnx.save_model(model, f"{d}/k.onnx", save_as_external_data=True, location="k.data")
        return ort.InferenceSession(f"{d}/k.onnx", so, providers=["CPUExecutionProvider"])


ORT_IDLE_S = 0.2  # longer than onnxruntime's post-run spin: its pool idle before ours runs


def bench_kernels(shapes: list[tuple[int, int, int]], *, threads: int | None = None, block: int = 32,
                  reps: int = 7, cycle_bytes: int = 1 << 30, measure_bw: bool = True, progress=print) -> dict:
    """int4 MatMulNBits y = x·Wᵀ: ours against onnxruntime, cycling through
    `cycle_bytes` of distinct weights so neither measures the last-level cache."""
    from edgeact.converters.quantize import quantize_blockwise
    from edgeact.runtime import QMatMul

    threads = threads or physical_cores()
    report = {"threads": threads, "block": block, "reps": reps, "shapes": []}
    if measure_bw:
        report["read_bandwidth_gbs"] = read_bandwidth(threads)
    rng = np.random.default_rng(0)
    for M, K, N in shapes:
        base = quantize_blockwise(rng.standard_normal((N, K), dtype=np.float32) * 0.02, bits=4,
                                  block_size=block, symmetric=True)
        wbytes = base.B.nbytes + base.scales.nbytes
        n_mats = max(2, -(-cycle_bytes // wbytes))
        # Distinct bytes per matrix (a rotated copy), same numeric character.
        mats = [base] + [type(base)(**{**base.__dict__, "B": np.roll(base.B, i, axis=0).copy(),
                                      "scales": np.roll(base.scales, i).copy()}) for i in range(1, n_mats)]
        progress(f"M={M} K={K} N={N}: {n_mats} matrices, {n_mats * wbytes / 1e6:.0f} MB cycled")
        x = rng.standard_normal((M, K), dtype=np.float32)
        kernels = [QMatMul(K, N, 4, block, m.B, m.scales, m.zero_points, threads=threads) for m in mats]
        y = np.empty((M, N), np.float32)

        def ours(x):
            for k in kernels:
                k(x, out=y)
        sess = _ort_matmulnbits_session(mats, K, N, block, threads)
        ours(x)
        sess.run(None, {"x": x})
        t_ours, t_ort = [], []
        for _ in range(reps):
            # Each timing starts after the other engine's pool has gone idle:
            # onnxruntime's workers spin >10 ms after a run and, on 2 cores,
            # steal the cores our threads need (0.77x instead of 1.35x).
            time.sleep(ORT_IDLE_S)
            t0 = time.perf_counter(); ours(x); t_ours.append((time.perf_counter() - t0) / n_mats)
            time.sleep(ORT_IDLE_S)
            t0 = time.perf_counter(); sess.run(None, {"x": x}); t_ort.append((time.perf_counter() - t0) / n_mats)
        mo, so_ = stats(t_ours)
        mr, sr = stats(t_ort)
        # each engine's GB/s counts the bytes it reads: ours its repack (fp16 scales when exact), onnxruntime the file's
        ours_bytes = kernels[0].bytes
        row = {"M": M, "K": K, "N": N, "weight_bytes": wbytes, "ours_weight_bytes": ours_bytes,
               "ours_us": mo * 1e6, "ours_us_spread": so_ * 1e6,
               "ort_us": mr * 1e6, "ort_us_spread": sr * 1e6, "speedup": mr / mo,
               "ours_gbs": ours_bytes / mo / 1e9, "ort_gbs": wbytes / mr / 1e9}
        if report.get("read_bandwidth_gbs"):
            row["ours_bw_share"] = row["ours_gbs"] / report["read_bandwidth_gbs"]
        report["shapes"].append(row)
        del sess, kernels
    return report


def format_kernels(report: dict) -> str:
    out = [f"int4 block {report['block']}, threads={report['threads']}, reps={report['reps']}"]
    if report.get("read_bandwidth_gbs"):
        out.append(f"measured memory read bandwidth: {report['read_bandwidth_gbs']:.1f} GB/s")
    out += ["", "| M | K | N | ours µs | onnxruntime µs | speed-up | ours GB/s (share of bw) |", "|---|---|---|---|---|---|---|"]
    for r in report["shapes"]:
        share = f" ({100 * r['ours_bw_share']:.0f}%)" if "ours_bw_share" in r else ""
