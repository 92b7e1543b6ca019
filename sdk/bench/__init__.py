"""`edgeact bench`: llama-bench-style speed figures, ours against the baselines in one run.

probes: the machine (bandwidth, CPU, clock, load) and the folder; subjects: what a worker
process times (an engine's raw step, or Model.generate); protocol: the order and isolation of
the runs and the contended-machine guard; race: jobs and derived figures; report: the table;
llamabench: building and parsing llama.cpp's own benchmark; kernels: the int4 matmul alone.
"""
from .kernels import bench_kernels, format_kernels
from .probes import physical_cores, read_bandwidth, rows_read_bandwidth
from .protocol import ContendedError
from .race import ENGINES, bench_models, ratio, stats
from .report import format_report
from .subjects import CACHE

__all__ = ["ENGINES", "CACHE", "ContendedError", "bench_models", "format_report", "bench_kernels", "format_kernels",
           "physical_cores", "read_bandwidth", "rows_read_bandwidth", "ratio", "stats"]
