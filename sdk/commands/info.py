"""`edgeact info MODEL_DIR`: what a model folder holds.

A folder that is not readable (no or bad edgeact.json, no model.onnx) or that the native runtime
refuses is an error: one line, exit code 2, after whatever could be described."""
from __future__ import annotations

import json
import math
from pathlib import Path

from edgeact.commands import COMMANDS

CONFIG_KEYS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
               "vocab_size")


def add_parser(sub) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"],
                       description="Describe a model folder: architecture and dims, quantization, sparsity, "
                       "steering points, tokenizer, source provenance, calibration, size on disk per file, and "
                       "what the native runtime makes of it. A folder that cannot be read or loaded is an error "
                       "(exit code 2).")
    p.add_argument("model", help="model folder")
    p.add_argument("--json", action="store_true", help="print edgeact.json plus file sizes as JSON")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _num(x) -> str:
    """A number as people read it: 4 significant digits, no float noise (0.35000000000000003 → 0.35)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) or (math.isfinite(x) and x == int(x) and abs(x) < 1e15):
        return str(int(x))
    return f"{x:.4g}"


def _spread(values) -> str:
    vals = sorted(float(v) for v in values)
    if not vals:
        return "none"
    med = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    return f"median {_num(med)} (range {_num(vals[0])}..{_num(vals[-1])}, {len(vals)} values)"


def _brief(value, depth: int = 0) -> str:
    """Any JSON record as one readable line: rounded numbers, long maps of numbers as their spread."""
    if isinstance(value, dict):
        if len(value) > 6 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            return _spread(value.values())
        if depth > 1:
            return f"{len(value)} entries"
        return ", ".join(f"{k} {_brief(v, depth + 1)}" for k, v in value.items())
    if isinstance(value, list):
        if len(value) > 6:
            return f"{len(value)} items"
        return "[" + ", ".join(_brief(v, depth + 1) for v in value) + "]"
    return _num(value)


def _calib_source(c: dict | None) -> str:
    if not c:
        return ""
    return f" on {_num(c.get('tokens'))} tokens ({c.get('source', '?')})"


def describe_calibration(cal: dict) -> str:
    if cal.get("method") == "awq" and "alphas" in cal:
        rtn, awq = cal.get("loss_rtn"), cal.get("loss_awq")
        loss = ""
        if isinstance(rtn, (int, float)) and isinstance(awq, (int, float)) and rtn > 0:
            loss = f"; output error {_num(awq)} vs {_num(rtn)} round-to-nearest ({100 * (awq / rtn - 1):+.0f}%)"
        not_folded = f"; not folded: {'; '.join(cal['not_folded'])}" if cal.get("not_folded") else ""
        return (f"AWQ{_calib_source(cal.get('calibration'))}, clipping {'on' if cal.get('clip') else 'off'}; "
                f"scale exponent α {_spread(cal['alphas'].values())}{loss}{not_folded}")
    return _brief(cal)


def describe_sparsity(sp: dict | None, cfg: dict) -> str:
    if not sp:
        return "dense"
    method = sp.get("method", "?")
    targets = ", ".join(f"{k} {_num(v)}" for k, v in (sp.get("targets") or {}).items())
    if method == "coreinfer":
        return (f"coreinfer: keeps {_num(sp.get('keep'))} of {_num(cfg.get('intermediate_size'))} FFN neurons per "
                f"layer, chosen after each prompt (target {targets}; token top-k {_num(sp.get('token_k'))})")
    return f"{method}: target {targets}; {_num(sp.get('sites'))} sites, calibrated{_calib_source(sp.get('calibration'))}"


def run(args) -> int:
    from edgeact.engines.base import read_meta

    folder = Path(args.model)
    meta = read_meta(folder)
    c = meta.get("config")
    if not isinstance(c, dict) or any(k not in c for k in CONFIG_KEYS):
        missing = [k for k in CONFIG_KEYS if not isinstance(c, dict) or k not in c]
        raise ValueError(f"{folder / 'edgeact.json'} is incomplete: config lacks {', '.join(missing)}")
    if not (folder / "model.onnx").is_file():
        raise ValueError(f"{folder} has no model.onnx: an incomplete model folder")
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    if args.json:
        print(json.dumps({**meta, "files": files}, indent=2))
        return 0
    q = meta.get("quantization") or {}
    tok = meta.get("tokenizer") or {}
    src = meta.get("source") or {}
    print(f"{folder}")
    print(f"  architecture   {c.get('arch')}: {c['num_layers']} layers, hidden {c['hidden_size']}, "
          f"FFN {c['intermediate_size']}, heads {c['num_heads']} (KV {c['num_kv_heads']}, head dim {c['head_dim']}), "
          f"vocab {c['vocab_size']}")
    from edgeact import DEFAULT_N_CTX

    ctx = meta.get("max_context")
    runs = f"; run and load() hold {DEFAULT_N_CTX} unless given --ctx-size / n_ctx" if (ctx or 0) > DEFAULT_N_CTX else ""
    print(f"  context        {ctx} (rope theta {_num(c.get('rope_theta'))}"
          f"{', scaling ' + _brief(c['rope_scaling']) if c.get('rope_scaling') else ''}){runs}")
    qs = f"{q.get('weights')}"
    if q.get("weights") in ("int4", "int8"):
        qs += (f" blockwise g{q.get('group_size')} {'symmetric' if q.get('symmetric') else 'with zero points'}, "
               f"method {q.get('method', 'rtn')}, accuracy_level {q.get('accuracy_level')}")
    print(f"  quantization   {qs}; lm_head {q.get('lm_head')}, embedding {q.get('embedding')}")
    print(f"  sparsity       {describe_sparsity(meta.get('sparsity'), c)}")
    st = meta.get("steering")
    print(f"  steering       {'after each of the ' + str(st.get('layers')) + ' layers' if st else 'none'}")
    print(f"  tokenizer      {tok.get('file') or 'none (token ids only)'}"
          f"{', chat template' if tok.get('chat_template') else ''}; bos {tok.get('bos_token_id')}, "
          f"eos {tok.get('eos_token_ids')}")
    dtypes = src.get("dtypes")
    print(f"  source         {src.get('format')} {src.get('path')}"
          f"{' (' + ', '.join(f'{k} {v}' for k, v in dtypes.items()) + ' tensors)' if isinstance(dtypes, dict) else ''}")
    if meta.get("calibration"):
        print(f"  calibration    {describe_calibration(meta['calibration'])}")
    print(f"  converter      edgeact {meta.get('converter_version')}")
    print("  files          " + ", ".join(f"{k} {_mb(v)}" for k, v in files.items()) + f"; total {_mb(sum(files.values()))}")
    from edgeact.engines import native_available

    if native_available():
        from edgeact.runtime import NativeModel

        try:
            info = NativeModel(folder).info()
        except Exception as e:  # noqa: BLE001 - the description above stands; the folder is still broken
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the native runtime cannot load {folder}: {msg}") from None
        print("  native         " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return 0
