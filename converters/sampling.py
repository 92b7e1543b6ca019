"""Text the fp32 source model writes itself, used when no calibration or
evaluation text is given (fixed seed, so every run sees the same tokens)."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def sample_ids(model, n_tokens: int, *, seed: int = 0, prompt_ids=None, bos_id: int | None = None,
               temperature: float = 1.0) -> np.ndarray:
    """Sample `n_tokens` new tokens from a transformers causal LM after `prompt_ids`
    (or BOS, or token 0). Returns prompt + sample as int64 [len]."""
    gen = torch.Generator().manual_seed(seed)
    if prompt_ids is None or len(prompt_ids) == 0:
        prompt_ids = [bos_id if bos_id is not None else 0]
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = model(ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    produced = []
    for _ in range(n_tokens):
        probs = torch.softmax(logits.double() / temperature, -1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        produced.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return np.array(list(prompt_ids) + produced, dtype=np.int64)
