"""The quality/speed curve of activation sparsity: for each method and target, convert,
measure quality against the fp32 source (one reference pass for all), realized sparsity,
and decode speed against our own dense int4 in the same run; a table and a PNG plot."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import numpy as np


def sweep(source, methods, sparsities, out_dir, *, quant="int4", group_size=32, quality=True, speed=True,
          n_tokens=256, engine="native", interleave=True, progress=print, bars: bool = False,
          calib_tokens: int = 1024) -> list[dict]:
    """`progress(line)` gets each finished row; `bars` shows tqdm bars for the long steps (the
    reference, the calibration sample, one step per variant)."""
    from tqdm import tqdm

    from edgeact.converters.calibration import calibration_ids
    from edgeact.converters.convert import convert
    from edgeact.converters.model import SourceModel
    from edgeact.converters.readers import read_source
    from edgeact.converters.sparsity import calibrate, parse_targets
    from edgeact.engines import native_available
    from edgeact.verify import verify_folder

    plan = [(m, s, parse_targets(str(s), m)) for m in methods for s in sparsities]   # bad settings fail first
    src = source if isinstance(source, SourceModel) else read_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    speed = speed and (engine != "native" or native_available())
    ref = None
    if quality:
        from edgeact.evaluate import Reference

        ref = Reference(src, n_tokens=n_tokens, seed=7, progress=bars)   # calibration samples other seeds: held out
    calib = None
    if any(m != "coreinfer" for m in methods):
        # one calibration sample and one fp32 model for every variant
        if ref is not None:
            model = ref.model
        else:
            from edgeact.converters.torch_ref import build_torch_model

            model = build_torch_model(src, progress=bars)
        calib = (model, calibration_ids(src, model, n_tokens=calib_tokens, progress=bars))
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
        (bar.write if bars else progress)(format_row(row))

    bar = tqdm(total=1 + len(plan), desc="sweep", unit="variant", disable=not bars)
    dense = out_dir / f"dense-{quant}-g{group_size}"
    if not (dense / "edgeact.json").exists():
        bar.set_postfix_str("converting dense")
        convert(src, dense, quant=quant, group_size=group_size, progress=False, overwrite=True, verify=verify_folder)
    bar.set_postfix_str("measuring dense")
    measure(dense, "dense", 0.0)
    bar.update(1)
    for method, s, targets in plan:
        folder = out_dir / f"{method}-{s:g}"
        if (folder / "edgeact.json").exists():
            shutil.rmtree(folder)
        bar.set_postfix_str(f"{method} {s:g}: calibrating")
        model, ids = calib if calib is not None and method != "coreinfer" else (None, None)
        sp = calibrate(src, method, targets, calib_ids=ids, model=model, progress=False)
        bar.set_postfix_str(f"{method} {s:g}: converting")
        convert(src, folder, quant=quant, group_size=group_size, progress=False, sparsity=sp, verify=verify_folder)
        bar.set_postfix_str(f"{method} {s:g}: measuring")
        measure(folder, method, s)
        bar.update(1)
    bar.close()
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
