"""Wall time of `edgeact --help` (and other quick commands), median of N fresh processes.

    python tools/bench_cli_startup.py                 # edgeact --help, 10 runs
    python tools/bench_cli_startup.py -n 20 -- run --help

Each run is a new interpreter (`python -m edgeact.cli ...`), so the figure includes Python's own
start-up; `python -c pass` is timed alongside as the floor. Also lists which heavy modules the
command imported (it should be none for --help). Measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "onnx", "onnxruntime", "transformers", "gguf", "numpy")


def timed(cmd: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=10, help="processes per command (default: 10)")
    ap.add_argument("args", nargs="*", default=["--help"], help="edgeact arguments (default: --help)")
    a = ap.parse_args()
    floor = timed([sys.executable, "-c", "pass"], a.runs)
    cli = timed([sys.executable, "-m", "edgeact.cli", *a.args], a.runs)
    probe = ("import sys\nfrom edgeact.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)")
    heavy = subprocess.run([sys.executable, "-c", probe, *a.args], capture_output=True, text=True).stderr.strip()
    print(f"python -c pass        median {statistics.median(floor) * 1e3:7.1f} ms  (min {min(floor) * 1e3:.1f})")
    print(f"edgeact {' '.join(a.args):13s} median {statistics.median(cli) * 1e3:7.1f} ms  (min {min(cli) * 1e3:.1f})")
    print(f"heavy modules imported: {heavy.splitlines()[-1] if heavy else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
