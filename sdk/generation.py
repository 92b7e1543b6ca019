"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Logits with everything outside top-k, then outside the top-p nucleus, set to -inf (float64).

    The same sets as transformers' TopKLogitsWarper and TopPLogitsWarper (in that order): top-k keeps
    every token tied with the k-th; top-p keeps the most likely tokens until their probability reaches
    top_p (at least one). Where tokens tie at the nucleus's edge all of them stay, as in top-k,
    rather than whichever a sort happens to put first."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if top_k and top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x[x < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        n = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, x.size)
        x[x < x[order[n - 1]]] = -np.inf
    return x


def apply_repetition_penalty(logits: np.ndarray, penalty: float, history) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty
    when positive, multiplied when negative (float64 copy)."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if penalty != 1.0 and len(history):
        idx = np.unique(np.asarray(history, dtype=np.int64))
        vals = x[idx]
        x[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return x


def probabilities(logits: np.ndarray, cfg: GenerationConfig, history=()) -> np.ndarray:
    """The distribution a sampled token is drawn from, in transformers' order: repetition penalty,
    temperature, top-k, top-p, softmax (float64 [vocab])."""
    x = filter_logits(apply_repetition_penalty(logits, cfg.repetition_penalty, history) / cfg.temperature,
                      cfg.top_k, cfg.top_p)
    p = np.exp(x - x.max())
    return p / p.sum()


def choose(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history=()) -> int:
    if cfg.temperature == 0:
        return int(np.argmax(apply_repetition_penalty(logits, cfg.repetition_penalty, history)))
    p = probabilities(logits, cfg, history)
    return int(rng.choice(p.size, p=p))
