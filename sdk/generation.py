"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty."""
from __future__ import annotations

import time
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
        for name in ("max_new_tokens", "top_k", "temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            integral = name in ("max_new_tokens", "top_k")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer) if integral else (int, float, np.number)):
                raise ValueError(f"{name} must be {'an integer' if integral else 'a number'}, got {v!r}")
            if not integral and not np.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Logits with everything outside top-k, then outside the top-p nucleus, set to -inf (float64).

    The same sets as transformers' TopKLogitsWarper and TopPLogitsWarper (in that order): top-k keeps
    every token tied with the k-th; top-p keeps the most likely tokens until their probability reaches
    top_p (at least one). Where tokens tie at the nucleus's edge all of them stay, as in top-k,
    rather than whichever a sort happens to put first."""
    return _filter_in_place(np.array(logits, dtype=np.float64), top_k, top_p)


def _filter_in_place(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    if top_k and top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x[x < kth] = -np.inf
    if top_p < 1.0:
        # sort only what top-k (or a constraint) left: the rest has probability 0 either way, and a
        # full-vocabulary sort per token would cost more than a small model's decode step
        live = np.flatnonzero(x > -np.inf)
        order = live[np.argsort(-x[live], kind="stable")]
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        n = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, order.size)
        x[x < x[order[n - 1]]] = -np.inf
    return x


def apply_repetition_penalty(logits: np.ndarray, penalty: float, history) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty
    when positive, multiplied when negative (float64 copy)."""
    x = np.array(logits, dtype=np.float64)   # one copy, also of float64 input
    if penalty != 1.0 and len(history):
        idx = np.unique(np.asarray(history, dtype=np.int64))
        vals = x[idx]
        x[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return x


def probabilities(logits: np.ndarray, cfg: GenerationConfig, history=()) -> np.ndarray:
    """The distribution a sampled token is drawn from, in transformers' order: repetition penalty,
    temperature, top-k, top-p, softmax (float64 [vocab])."""
    x = _tempered(logits, cfg, history)
    p = np.exp(x - x.max())
    return p / p.sum()


def _tempered(logits, cfg: GenerationConfig, history) -> np.ndarray:
    """probabilities()'s filtered logits, worked on one float64 copy: a step's 262k-token logits
    would otherwise leave a 2 MB array per stage for the heap to keep."""
    x = apply_repetition_penalty(logits, cfg.repetition_penalty, history)
    x /= cfg.temperature
    return _filter_in_place(x, cfg.top_k, cfg.top_p)


def choose(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history=()) -> int:
    if cfg.temperature == 0:
        return int(np.argmax(apply_repetition_penalty(logits, cfg.repetition_penalty, history)))
    x = _tempered(logits, cfg, history)
    # probabilities() over the tokens left only: rng.choice(vocab, p=...) draws one uniform and
    # searches the cumulative sum, to which the others' zeros add nothing, so searching the live
    # tokens' sum (in id order) picks the same token from the same draw at a fraction of the work
    live = np.flatnonzero(x > -np.inf)
    p = np.exp(x[live] - x[live].max())
    cdf = np.cumsum(p / p.sum())
    cdf /= cdf[-1]
    return int(live[min(int(cdf.searchsorted(rng.random(), side="right")), live.size - 1)])


def token_logprobs(logits, tok: int, top: int = 0) -> dict:
    """log softmax of the chosen token (and the `top` best) from one step's logits."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    out = {"id": int(tok), "logprob": float(x[tok] - lse), "top": []}
    if top:
        best = np.argpartition(-x, top - 1)[:top]
        best = best[np.argsort(-x[best], kind="stable")]
        out["top"] = [(int(i), float(x[i] - lse)) for i in best if np.isfinite(x[i])]
    return out


def decode(eng, logits, cfg: GenerationConfig, rng: np.random.Generator, history: list[int], eos, timing: dict, *,
           constraint=None, no_eos=None, logprobs: list | None = None, top_logprobs: int = 0, after_first=None,
           fed=None):
    """Tokens chosen from `logits` (the prompt's last) on, each fed back through eng.forward: the
    decode loop of Model.generate and Session.generate. Stops after an end-of-sequence token or
    max_new_tokens, or sets timing["constraint_done"] / timing["context"] when the constraint is
    complete / the context is full. no_eos: ids never picked. after_first(): once, before the first
    token is fed (steering's generated phase); fed(tok): after each token is in the cache."""
    t1 = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        if constraint is not None:
            logits = constraint.mask(logits)
        if no_eos is not None:
            logits = np.array(logits, dtype=np.float32, copy=True)
            logits[no_eos] = -np.inf
        tok = choose(logits, cfg, rng, history)
        if constraint is not None:
            constraint.accept(tok)
        if logprobs is not None:
            logprobs.append(token_logprobs(logits, tok, top_logprobs))
        history.append(tok)
        timing["decode_s"] = time.perf_counter() - t1
        yield tok
        if tok in eos or step == cfg.max_new_tokens - 1:
            return
        if constraint is not None and constraint.done:
            timing["constraint_done"] = True
            return
        if eng.n_past >= eng.max_context:
            timing["context"] = True
            return
        if step == 0:
            if after_first is not None:
                after_first()
            t1 = time.perf_counter()
        logits = eng.forward(np.array([tok], dtype=np.int64), logits="last")[-1]
        if fed is not None:
            fed(tok)
