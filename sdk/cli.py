"""The `edgeact` command: convert | run | eval | info | bench | steer | sweep.

Every failure the user can fix (a missing file, a bad option value, a token id out
of range, a missing optional package) is one line on stderr and exit code 2;
EDGEACT_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from edgeact import __version__
from edgeact.commands import COMMANDS

EPILOG = """examples:
  edgeact run -p "Write a haiku about the sea"          # default model (SmolLM2-135M-Instruct, its own 4-bit blocks)
  edgeact convert model.gguf -o model-int4/ --quant int4 --group-size 32
  edgeact run model-int4/ -p "Hello" -n 64
  edgeact eval model-int4/ --ref model.gguf
  edgeact info model-int4/
  edgeact bench model-int4/ --engines native,ort,llama.cpp
  edgeact steer compute model-int4/ --pos pos.txt --neg neg.txt -o vec.gguf
  edgeact run model-int4/ --chat                          # interactive chat; the cache carries the turns
  edgeact serve model-int4/ --vectors vecs/               # OpenAI-compatible server on 127.0.0.1:8080
  edgeact profile model-int4/ -o profile.png              # where a token's time goes, per op
"""

# Commands that cannot do anything without the converter packages (checked before their
# parser is built, since the converter options themselves come from modules that import them).
NEEDS_CONVERT = {"convert": ("onnx", "torch"), "eval": ("onnx", "onnxruntime", "torch"),
                 "sweep": ("onnx", "onnxruntime", "torch")}


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' only where it says something: not when the help already names the
    default, not for flags (store_true/false), not for None or an empty list."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (not action.option_strings or action.nargs == 0 or "default" in text.lower()
                or d is None or d is argparse.SUPPRESS or isinstance(d, bool) or d == "" or d == []):
            return text
        return text + " (default: %(default)s)"


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other error (argparse prints the whole usage)."""

    def __init__(self, *args, formatter_class=None, **kw):
        if formatter_class is argparse.RawDescriptionHelpFormatter:
            formatter_class = RawHelpFormatter
        elif formatter_class in (None, argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
            formatter_class = HelpFormatter
        super().__init__(*args, formatter_class=formatter_class, **kw)

    help_hint = None  # the top-level parser points at the chosen command's help

    def error(self, message):
        if message.startswith("unrecognized arguments") and self.help_hint in ("edgeact run", "edgeact profile"):
            message += " (the prompt goes after -p, quoted)"
        self.exit(2, f"edgeact: error: {message} (see `{self.help_hint or self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (only=NAME) one in which only that command declares its options: the
    others are listed by name and help, so `edgeact --help` imports no command module."""
    p = Parser(prog="edgeact", description="Convert, run, evaluate, benchmark and steer small "
               "language models on edge devices.", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"edgeact {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_line in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"edgeact.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return p


def _command(argv) -> str:
    """The subcommand argparse will pick: the first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def _error(msg: str) -> int:
    print(f"edgeact: error: {msg}", file=sys.stderr)
    return 2


def _warning_line(message, category, filename, lineno, file=None, line=None):
    """Warnings from the library (e.g. a llama2.c checkpoint without its tokenizer) as one plain line."""
    print(f"edgeact: warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    import warnings

    from edgeact.extras import first_missing, install_hint, is_optional

    warnings.showwarning = _warning_line
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    if command in NEEDS_CONVERT and not {"-h", "--help"} & set(argv):
        missing = first_missing(NEEDS_CONVERT[command])
        if missing:
            return _error(f"edgeact {command} needs {missing}, which the device install leaves out: "
                          f"{install_hint(missing)}")
    parser = build_parser(command if command in COMMANDS else "")
    if command in COMMANDS:
        parser.help_hint = f"edgeact {command}"
    args = parser.parse_args(argv)
    module = importlib.import_module(f"edgeact.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nedgeact: interrupted", file=sys.stderr)  # on its own line after streamed text
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        if os.environ.get("EDGEACT_DEBUG"):
            raise
        if is_optional(e):
            from edgeact.extras import MissingExtra, missing_message

            return _error(str(e) if isinstance(e, MissingExtra) else missing_message(e.name, f"edgeact {args.command}"))
        from edgeact.converters.model import ConversionError

        known = (ConversionError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, known):
            msg = f"{type(e).__name__}: {msg} (EDGEACT_DEBUG=1 for the traceback)"
        return _error(msg)


if __name__ == "__main__":
    sys.exit(main())
