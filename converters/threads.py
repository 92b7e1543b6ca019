"""torch's thread count while a conversion runs: every physical core for the dense products of
the searches and the sampler, one thread where extra threads only wait."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use: a second hyperthread on a core adds
    little to the dense float32 products the searches spend their time in, and shares its caches."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(topo + "physical_package_id") as f, open(topo + "core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def all_cores():
    """torch on every physical core this process may use while a conversion runs (it has the machine to itself)."""
    return torch_threads(physical_cores())
