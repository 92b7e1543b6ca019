"""`edgeact bench`'s table: one row per engine, its ratios, and the machine it ran on."""
from __future__ import annotations

from pathlib import Path


def machine_line(report: dict) -> str:
    m = report.get("machine") or {}
    clk = m.get("clock") or {}
    mhz = clk.get("cur_mhz") or clk.get("cpuinfo_mhz")
    parts = [m.get("cpu") or "?", f"kernels {m['isa']}" if m.get("isa") else None,
             f"{m.get('physical_cores')} cores" if m.get("physical_cores") else None,
             f"{mhz:.0f} MHz" + (f" ({clk['governor']})" if clk.get("governor") else "") if mhz else None,
             "load at start " + " ".join(f"{x:.2f}" for x in m["load_average_at_start"])
             if m.get("load_average_at_start") else None, m.get("date")]
    return "machine: " + ", ".join(p for p in parts if p)


def format_report(report: dict) -> str:
    order = ("each repetition a fresh process, engines alternating" if report.get("interleaved")
             else "each engine's repetitions back to back")
    out = []
    if report.get("contended"):
        out.append("CONTENDED: another job was running when this started (--allow-contended); "
                   "these figures are not a comparison")
    out.append(f"threads={report['threads']}  pp={report['pp']}  tg={report['tg']}  reps={report['reps']} ({order}; "
               "median ± stddev; ratios: median of per-repetition ratios when alternating)")
    if report.get("machine"):
        out.append(machine_line(report))
    if report.get("read_bandwidth_gbs"):
        out.append(f"measured memory read bandwidth: {report['read_bandwidth_gbs']:.1f} GB/s")
    rows = report.get("rows_read")
    if rows and report.get("read_bandwidth_gbs"):
        share = rows["gbs"] / report["read_bandwidth_gbs"]
        out.append(f"scattered reads, a random {100 * rows['active']:.0f}% of {rows['row_bytes']}-byte rows read whole (the "
                   f"input-sparse GEMV's reads of a matrix with {2 * rows['row_bytes']} int4 outputs): {rows['gbs']:.1f} GB/s, "
                   f"{100 * share:.0f}% of the sequential rate; reading that share this way takes "
                   f"{rows['active'] / share:.2f}× the time of reading every row in order")
    out.append("")
    out.append(f"| model | engine | pp{report['pp']} t/s | tg{report['tg']} t/s | decode GB/s (share of bw) | peak RSS MB (÷ weights+KV) |")
    out.append("|---|---|---|---|---|---|")
    fmt = lambda r, t: f"{r[t + '_median']:.1f} ± {r[t + '_spread']:.1f}" if r.get(t) else "–"  # noqa: E731
    for m in report["models"]:
        name = Path(m["folder"]).name
        for eng, r in m["engines"].items():
            label = r.get("label", eng)
            if "skipped" in r or "error" in r:
                out.append(f"| {name} | {label} | {r.get('skipped') or 'error: ' + r['error']} | | | |")
                continue
            bw = f"{r['decode_gbs']:.1f} ({100 * r['bandwidth_share']:.0f}%)" if "bandwidth_share" in r else \
                (f"{r['decode_gbs']:.1f}" if "decode_gbs" in r else "")
            rss = f"{r['peak_rss'] / 1e6:.0f} ({r['rss_over_weights_kv']:.2f}×)" if r.get("peak_rss") else \
                "(own process)"
            out.append(f"| {name} | {label} | {fmt(r, 'pp')} | {fmt(r, 'tg')} | {bw} | {rss} |")
        for key, label in (("native_vs_llama.cpp", "native ÷ llama.cpp"), ("native_vs_llama.cpp-py", "native ÷ llama.cpp-py"),
                           ("native_vs_ort", "native ÷ ort"), ("native_vs_torch", "native ÷ torch"),
                           ("generate_vs_native", "generate ÷ native step"),
                           ("llama.cpp-py_vs_llama.cpp", "llama.cpp-py ÷ llama-bench"), ("native_vs_dense", None)):
            if key in m:
                v = m[key]
                label = label or f"native ÷ {v['model']} (dense)"
                out.append(f"| {name} | {label} | {v['pp']:.2f}× | {v['tg']:.2f}× | | |")
        if "lowmem_vs_native" in m:
            v, lo, na = m["lowmem_vs_native"], m["engines"]["native-lowmem"], m["engines"]["native"]
            out.append(f"| {name} | native-lowmem ÷ native | {v['pp']:.2f}× | {v['tg']:.2f}× | | "
                       f"{lo['peak_rss'] / na['peak_rss']:.2f}× |")
    sparse = [(Path(m["folder"]).name, m["engines"]["native"]["realized_sparsity"]) for m in report["models"]
              if "realized_sparsity" in m["engines"].get("native", {})]
    if sparse:
        out += ["", "realized sparsity in native decode (share of zeroed linear inputs):"]
        out += [f"  {name}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sp.items()) for name, sp in sparse]
    paths = [(Path(m["folder"]).name, m["engines"]["native"]["sparse_path_share"]) for m in report["models"]
             if m["engines"].get("native", {}).get("sparse_path_share")]
    if paths:
        out += ["", "decode calls on the input-sparse GEMV (the rest: dense GEMV on the masked input, measured faster):"]
        out += [f"  {name}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sp.items()) for name, sp in paths]
    return "\n".join(out)
