"""Text the fp32 source model writes itself, used when no calibration or
evaluation text is given (fixed seed, so every run sees the same tokens)."""
from __future__ import annotations

import types
from contextlib import contextmanager

import numpy as np
import torch

from .threads import physical_cores, torch_threads

# A decode step's linears read a handful of rows (one per sequence); above this it is a prefill.
_DECODE_ROWS = 16


def sample_ids(model, n_tokens: int, *, seed: int = 0, prompt_ids=None, bos_id: int | None = None,
               temperature: float = 1.0, progress: bool = False, desc: str = "sampling text") -> np.ndarray:
    """Sample `n_tokens` new tokens from a transformers causal LM after `prompt_ids`
    (or BOS, or token 0). Returns prompt + sample as int64 [len]."""
    return sample_batch(model, n_tokens, seeds=[seed], prompt_ids=prompt_ids, bos_id=bos_id,
                        temperature=temperature, progress=progress, desc=desc)[0]


@torch.inference_mode()   # no autograd bookkeeping per op: the same tokens, 4% faster
def sample_batch(model, n_tokens: int, *, seeds, prompt_ids=None, bos_id: int | None = None,
                 temperature: float = 1.0, progress: bool = False, desc: str = "sampling text") -> np.ndarray:
    """One sequence per seed, all decoded together: [len(seeds), prompt + n_tokens] int64.

    The rows share every forward pass (one weight read per step for all of them) but each
    draws from its own generator, so row i depends only on seeds[i].
    """
    # A decode step is many small ops: extra threads mostly wait at OpenMP barriers, and on a
    # loaded machine a descheduled thread stalls every op. So one thread, except inside the
    # linears' products, which stream every weight once per step and split W's rows over the cores.
    with torch_threads(1), _decode_products(model, physical_cores()):
        return _sample(model, n_tokens, seeds, prompt_ids, bos_id, temperature, progress, desc)


def _decode_linear(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward as W·xᵀ when x has few rows: torch computes x·Wᵀ for a handful of rows
    on one core at about a third of the read bandwidth, while W·xᵀ runs at full bandwidth."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.shape[0] > _DECODE_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    # Row-major rows and result: MKL's product with xᵀ stored contiguously (what a transposed
    # result fed to the next linear would give) runs at a third of the speed.
    y = torch.matmul(self.weight, rows.contiguous().T).T.contiguous().reshape(*x.shape[:-1], self.weight.shape[0])
    return y if self.bias is None else y + self.bias


def _threaded(fn, n: int):
    def run(*args):
        with torch_threads(n):
            return fn(*args)
    return run


@contextmanager
def _decode_products(model, threads: int):
    """The model's nn.Linear modules compute decode steps as W·xᵀ on `threads` threads inside the block."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for m in linears:
        m.forward = _threaded(types.MethodType(_decode_linear, m), threads)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def _sample(model, n_tokens, seeds, prompt_ids, bos_id, temperature, progress, desc) -> np.ndarray:
    from tqdm import tqdm

    if prompt_ids is None or len(prompt_ids) == 0:
        prompt_ids = [bos_id if bos_id is not None else 0]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    ids = torch.tensor([list(prompt_ids)] * len(gens), dtype=torch.long)
    out = model(ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    produced = []
    with tqdm(total=n_tokens * len(gens), desc=desc, unit="tok", disable=not progress) as bar:
        for _ in range(n_tokens):
            probs = torch.softmax(logits.double() / temperature, -1)
            nxt = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])
            produced.append(nxt)
            out = model(nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            bar.update(len(gens))
    rows = torch.cat([ids] + [t[:, None] for t in produced], dim=1) if produced else ids
    return rows.numpy().astype(np.int64)
