"""The quality/speed curve of activation sparsity: for each method and target, convert,
measure quality against the fp32 source (one reference pass for all), realized sparsity,
and decode speed against our own dense int4 in the same run; a table and a PNG plot."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import numpy as np


def sweep(source, methods, sparsities, out_dir, *, quant="int4", group_size=32, quality=True, speed=True,
          n_tokens=256, engine="native", interleave=True, progress=print) -> list[dict]:
    from edgeact.converters.convert import convert
    from edgeact.converters.model import SourceModel
    from edgeact.converters.readers import read_source
    from edgeact.converters.sparsity import calibrate, parse_targets
    from edgeact.engines import native_available

    src = source if isinstance(source, SourceModel) else read_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    speed = speed and (engine != "native" or native_available())
    ref = None
    if quality:
        from edgeact.evaluate import Reference

        ref = Reference(src, n_tokens=n_tokens, seed=7)   # calibration samples other seeds: held out
    rows = []

    def measure(folder, method, target):
        row = {"method": method, "target": target, "folder": str(folder)}
        if ref is not None:
            row.update(ref.compare(folder).to_dict())
            if method == "coreinfer":   # a fixed share of FFN neurons per prompt, by construction
                from edgeact.engines import read_meta

                meta = read_meta(folder)
                row["realized"] = 1.0 - meta["sparsity"]["keep"] / meta["config"]["intermediate_size"]
            else:
                r = realized_sparsity(folder, ref.ids) if method != "dense" else {}
                row["realized"] = float(np.mean(list(r.values()))) if r else 0.0
        rows.append(row)
        progress(format_row(row))

    dense = out_dir / f"dense-{quant}-g{group_size}"
    if not (dense / "edgeact.json").exists():
        convert(src, dense, quant=quant, group_size=group_size, progress=False, overwrite=True)
    measure(dense, "dense", 0.0)
    for method in methods:
        for s in sparsities:
            folder = out_dir / f"{method}-{s:g}"
            if (folder / "edgeact.json").exists():
                shutil.rmtree(folder)
            sp = calibrate(src, method, parse_targets(str(s), method), progress=False)
            convert(src, folder, quant=quant, group_size=group_size, progress=False, sparsity=sp)
            measure(folder, method, s)
    if speed:
        decode_speeds(rows, engine, progress, interleave=interleave)
    return rows


def realized_sparsity(folder, ids) -> dict[str, float]:
    """Share of zeros at every Sparsify output when onnxruntime runs `ids` (a fresh sequence),
    by site ("layers.{i}.attn_in", ...)."""
    import onnx

    from edgeact.engines.ort_engine import OrtEngine

    eng = OrtEngine(folder)
    model = onnx.load(str(eng.folder / "model.onnx"), load_external_data=False)
    names = [n.output[0] for n in model.graph.node if n.op_type == "Sparsify"]
    outs = eng.probe(ids, names)
    return {n.rsplit(".sparsify", 1)[0]: float((o == 0).mean()) for n, o in outs.items()}


def decode_speeds(rows: list[dict], engine: str = "native", progress=print, reps: int = 5,
                  interleave: bool = True) -> None:
    """tg64 (decode after one token) for every variant through edgeact bench (a pp16 pass is
    timed too, not reported): by default all loaded at once and timed in turn, so a drift of
    the machine hits every variant alike; the speed-up over dense (rows[0]) is then the median
    of the per-repetition ratios."""
    from edgeact.bench import bench_models, ratio as _ratio

    progress(f"decode speed of {len(rows)} variants, {reps} {'interleaved ' if interleave else ''}repetitions ...")
    report = bench_models([r["folder"] for r in rows], engines=(engine,), pp=16, tg=64, reps=reps,
                          measure_bw=False, interleave=interleave, allow_contended=True, progress=lambda *_: None)
    runs = [m["engines"].get(engine, {}) for m in report["models"]]
    for r, res in zip(rows, runs):
        if res.get("tg"):
            r["tg"] = statistics.median(res["tg"])
            if runs[0].get("tg"):
                r["speedup"] = _ratio(res["tg"], runs[0]["tg"], paired=interleave)
        elif "error" in res:
            progress(f"{r['method']} {r['target']:.2f}: speed not measured ({res['error']})")


def format_row(r: dict) -> str:
    q = (f"KL {r['kl']:.4f}  top-1 {100 * r['top1']:.1f}%  ppl×{r['ppl_ratio']:.3f}  realized {100 * r['realized']:.0f}%"
         if "kl" in r else "")
    s = f"  tg {r['tg']:.1f} t/s" if r.get("tg") else ""
    return f"{r['method']:>6} {r['target']:.2f}  {q}{s}"


def format_table(rows: list[dict]) -> str:
    out = ["| method | target | realized | KL vs fp32 | top-1 | ppl ratio | tg t/s | speed-up vs dense |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "–")  # noqa: E731
        out.append(f"| {r['method']} | {r['target']:.2f} | {f('realized', '{:.0%}')} | {f('kl', '{:.4f}')} | "
                   f"{f('top1', '{:.1%}')} | {f('ppl_ratio', '{:.3f}')} | {f('tg', '{:.1f}')} | {f('speedup', '{:.2f}×')} |")
    return "\n".join(out)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    have_speed = all(r.get("speedup") for r in rows)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] in (method, "dense")]
        xs = [r["speedup"] if have_speed else r["target"] for r in pts]
        ax.plot(xs, [r["kl"] for r in pts], "o-", label=method)
    ax.set_xlabel("decode speed-up over dense int4" if have_speed else "target sparsity")
    ax.set_ylabel("KL vs fp32 (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
