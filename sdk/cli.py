"""The `edgeact` command: convert | run | eval | info | bench | steer.

Every failure the user can fix (a missing file, a bad option value, a token id out
of range) is one line on stderr and exit code 2; EDGEACT_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from edgeact import __version__

EPILOG = """examples:
  edgeact run -p "Write a haiku about the sea"          # default model (SmolLM2-135M-Instruct, int4)
  edgeact convert model.gguf -o model-int4/ --quant int4 --group-size 32
  edgeact run model-int4/ -p "Hello" -n 64
  edgeact eval model-int4/ --ref model.gguf
  edgeact info model-int4/
  edgeact bench model-int4/ --engines native,ort,llama.cpp
  edgeact steer compute model-int4/ --pos pos.txt --neg neg.txt -o vec.gguf
"""


def build_parser() -> argparse.ArgumentParser:
    from edgeact.commands import COMMANDS

    p = argparse.ArgumentParser(prog="edgeact", description="Convert, run, evaluate, benchmark and steer small "
                                "language models on edge devices.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"edgeact {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"edgeact.commands.{name}").add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(f"edgeact.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("edgeact: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        from edgeact.converters.model import ConversionError

        if os.environ.get("EDGEACT_DEBUG"):
            raise
        known = (ConversionError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, known):
            msg = f"{type(e).__name__}: {msg} (EDGEACT_DEBUG=1 for the traceback)"
        print(f"edgeact: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
