"""`edgeact info MODEL_DIR`: what a model folder holds."""
from __future__ import annotations

import json
from pathlib import Path

from edgeact.commands import COMMANDS


def add_parser(sub) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"],
                       description="Describe a model folder: architecture and dims, quantization, sparsity, "
                       "steering points, tokenizer, source provenance, and size on disk per file.")
    p.add_argument("model", help="model folder")
    p.add_argument("--json", action="store_true", help="print edgeact.json plus file sizes as JSON")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args) -> int:
    from edgeact.engines.base import read_meta

    folder = Path(args.model)
    meta = read_meta(folder)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    if args.json:
        print(json.dumps({**meta, "files": files}, indent=2))
        return 0
    c, q = meta["config"], meta.get("quantization") or {}
    tok = meta.get("tokenizer") or {}
    src = meta.get("source") or {}
    print(f"{folder}")
    print(f"  architecture   {c.get('arch')}: {c['num_layers']} layers, hidden {c['hidden_size']}, "
          f"FFN {c['intermediate_size']}, heads {c['num_heads']} (KV {c['num_kv_heads']}, head dim {c['head_dim']}), "
          f"vocab {c['vocab_size']}")
    from edgeact import DEFAULT_N_CTX

    ctx = meta.get("max_context")
    runs = f"; run and load() hold {DEFAULT_N_CTX} unless given --ctx-size / n_ctx" if (ctx or 0) > DEFAULT_N_CTX else ""
    print(f"  context        {ctx} (rope theta {c.get('rope_theta')}"
          f"{', scaling ' + str(c['rope_scaling']) if c.get('rope_scaling') else ''}){runs}")
    qs = f"{q.get('weights')}"
    if q.get("weights") in ("int4", "int8"):
        qs += (f" blockwise g{q.get('group_size')} {'symmetric' if q.get('symmetric') else 'with zero points'}, "
               f"method {q.get('method', 'rtn')}, accuracy_level {q.get('accuracy_level')}")
    print(f"  quantization   {qs}; lm_head {q.get('lm_head')}, embedding {q.get('embedding')}")
    sp = meta.get("sparsity")
    print(f"  sparsity       {json.dumps(sp) if sp else 'dense'}")
    st = meta.get("steering")
    print(f"  steering       {'after each of the ' + str(st.get('layers')) + ' layers' if st else 'none'}")
    print(f"  tokenizer      {tok.get('file') or 'none (token ids only)'}"
          f"{', chat template' if tok.get('chat_template') else ''}; bos {tok.get('bos_token_id')}, "
          f"eos {tok.get('eos_token_ids')}")
    print(f"  source         {src.get('format')} {src.get('path')} {json.dumps(src.get('dtypes')) if src.get('dtypes') else ''}")
    if meta.get("calibration"):
        print(f"  calibration    {json.dumps(meta['calibration'])[:200]}")
    print(f"  converter      edgeact {meta.get('converter_version')}")
    print(f"  files          " + ", ".join(f"{k} {_mb(v)}" for k, v in files.items()) + f"; total {_mb(sum(files.values()))}")
    try:
        from edgeact.engines import native_available

        if native_available():
            from edgeact.runtime import NativeModel

            info = NativeModel(folder).info()
            print(f"  native         " + ", ".join(f"{k} {v}" for k, v in info.items()))
    except Exception as e:  # noqa: BLE001 - info still useful without the native view
        print(f"  native         cannot load: {e}")
    return 0
