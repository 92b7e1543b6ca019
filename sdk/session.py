"""Sessions that keep their KV cache across turns, on weights shared with the Model.

`model.session()` gives a Session: its own engine state (KV cache, steering) over the model's
loaded weights (the native runtime: one ea_model, one ea_session per Session). Each call finds
the longest prefix of the new prompt that the cache already holds (computed under the same
steering), truncates the cache to it and runs only the rest, so a chat's next turn prefills only
the new messages. `steering=` and `json_schema=` apply to one call.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Iterator

import numpy as np

from edgeact.generation import GenerationConfig, decode
from edgeact.steering import Steering, SteeringEntry


class Session:
    """One conversation's cache. Not for two threads at once; make one Session per concurrent user."""

    def __init__(self, model, engine=None):
        """engine: run on this engine instead of a fork of the model's (the server gives its first
        session the model's own, which it never uses otherwise: one KV cache fewer)."""
        self.model = model
        self.engine = engine if engine is not None else model.engine.fork()
        self.ids: list[int] = []       # the tokens whose keys and values the cache holds, in order
        self._keys: list[str] = []     # per cached token: the steering it was computed under
        self._steering = Steering(model.config.num_layers, model.config.hidden_size)
        self.last = {"cached_tokens": 0, "prefilled_tokens": 0}
        self.lock = threading.Lock()   # taken by callers that share sessions (the server's pool)

    def __repr__(self) -> str:
        return f"Session(cached={len(self.ids)} tokens, memory={self.memory_bytes / 2**20:.1f} MiB)"

    # ---- state
    @property
    def memory_bytes(self) -> int:
        """What this session holds beyond the model's shared weights (the native runtime: the KV
        cache sized for the context and the activation buffers; onnxruntime: the KV cache so far)."""
        return self.engine.memory_bytes

    def reset(self) -> None:
        self.engine.reset()
        self.ids, self._keys = [], []

    def steer(self, vec_or_path, scale=1.0, layers=None, mode="add", apply_to="all") -> SteeringEntry:
        """Steering for every later call of this session (Model.steer's arguments)."""
        entry = self._steering.make_entry(vec_or_path, scale, layers, mode, apply_to)
        self._steering.entries.append(entry)
        return entry

    def clear_steering(self) -> None:
        self._steering.entries.clear()

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (e.g. to undo a turn)."""
        self.engine.truncate(min(int(n), self.engine.n_past))
        del self.ids[self.engine.n_past:], self._keys[self.engine.n_past:]

    def common_prefix(self, ids) -> int:
        """How many leading tokens of `ids` the cache holds (for choosing among sessions)."""
        n = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            n += 1
        return n

    # ---- compute
    def _call_steering(self, steering) -> Steering:
        state = Steering(self._steering.num_layers, self._steering.hidden_size)
        state.entries = list(self._steering.entries) + parse_steering(state, steering)
        return state

    def prefill(self, ids, key: str = "") -> np.ndarray:
        """Bring the cache to `ids` (reusing the longest cached prefix computed under steering `key`)
        and return the last token's logits."""
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        eng = self.engine
        n = 0
        for a, b, k in zip(self.ids, ids, self._keys):
            if a != b or k != key:
                break
            n += 1
        n = min(n, len(ids) - 1)  # the last token always runs: its logits start the reply
        if eng.core_keep is not None:
            n = 0  # CoreInfer chooses its neuron set from the whole prompt
        try:
            eng.truncate(n)
        except ValueError:  # a sliding-window cache no longer holds the positions before n: start over
            n = 0
            eng.reset()
        del self.ids[n:], self._keys[n:]
        self.last = {"cached_tokens": n, "prefilled_tokens": len(ids) - n}
        logits = eng.forward(np.asarray(ids[n:], dtype=np.int64), logits="last")[-1]
        self.ids += ids[n:]
        self._keys += [key] * (len(ids) - n)
        return logits

    def tokens(self, prompt_ids: list[int], cfg: GenerationConfig, timing: dict, steering=None,
               constraint=None, ignore_eos: bool = False, logprobs: list | None = None,
               top_logprobs: int = 0) -> Iterator[int]:
        """New token ids after `prompt_ids` (Model._stream's token source). ignore_eos: never pick an
        end-of-sequence token (fixed-length replies for benchmarks). logprobs: a list that receives,
        per token, {"id", "logprob", "top": [(id, logprob)] * top_logprobs} (after any mask, before
        temperature)."""
        cfg.validate()
        if len(prompt_ids) > self.engine.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than the context "
                             f"({self.engine.max_context})")
        state = self._call_steering(steering)
        keys = {g: steering_key(state, g) for g in (False, True)}
        rng = np.random.default_rng(cfg.seed)
        eng = self.engine
        eos = self.model.eos_token_ids
        no_eos = np.array(sorted(eos), dtype=np.int64) if ignore_eos and eos else None
        state.apply(eng, generated=False)
        try:
            t0 = time.perf_counter()
            logits = self.prefill(prompt_ids, keys[False])
            timing["prefill_s"] = time.perf_counter() - t0
            timing["cached_tokens"] = self.last["cached_tokens"]

            def fed(tok):
                self.ids.append(tok)
                self._keys.append(keys[True])

            yield from decode(eng, logits, cfg, rng, list(prompt_ids), eos, timing, constraint=constraint,
                              no_eos=no_eos, logprobs=logprobs, top_logprobs=top_logprobs, fed=fed,
                              after_first=(lambda: state.apply(eng, generated=True)) if state.phase_dependent
                              else None)
        finally:
            # the cache and self.ids agree whatever stopped the loop (an error, a closed stream)
            del self.ids[eng.n_past:], self._keys[eng.n_past:]
            eng.clear_steering()

    def _stream(self, prompt, cfg: GenerationConfig, result: dict, steering=None, json_schema=None,
                ignore_eos: bool = False, logprobs: list | None = None, top_logprobs: int = 0):
        from edgeact.grammar import JsonSchemaConstraint

        constraint = json_schema
        if json_schema is not None and not isinstance(json_schema, JsonSchemaConstraint):
            constraint = JsonSchemaConstraint(self.model, json_schema)
        return self.model._stream(prompt, cfg, result, tokens=lambda ids, c, timing: self.tokens(
            ids, c, timing, steering=steering, constraint=constraint, ignore_eos=ignore_eos, logprobs=logprobs,
            top_logprobs=top_logprobs))

    def stream(self, prompt, max_new_tokens: int = 128, steering=None, json_schema=None, **kw) -> Iterator[str]:
        """Text pieces as they become final (token ids for a folder without a tokenizer)."""
        yield from self._stream(prompt, GenerationConfig(max_new_tokens=max_new_tokens, **kw), {},
                                steering, json_schema)

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=None, repetition_penalty: float = 1.0,
                 on_text=None, steering=None, json_schema=None, ignore_eos: bool = False):
        """Model.generate on this session's cache. `steering`: a list of {vector, scale, layers,
        mode, apply_to} dicts (vector: an array, {layer: array}, [layers, hidden] or a control-vector
        path) for this call only. `json_schema`: a JSON schema (dict or string) the reply must match.
        `ignore_eos`: never end at an end-of-sequence token (fixed-length replies for benchmarks)."""
        from edgeact.api import GenerationResult

        cfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                               [stop] if isinstance(stop, str) else [] if stop is None else stop)
        result: dict = {}
        for piece in self._stream(prompt, cfg, result, steering, json_schema, ignore_eos):
            if on_text is not None and isinstance(piece, str):
                on_text(piece)
        result["stats"] = dict(self.last, memory_bytes=self.memory_bytes)
        return GenerationResult(**result)

    def chat(self, messages, **gen):
        """One assistant turn after `messages` ([{role, content}] or one user string); the previous
        turns' tokens come from the cache."""
        return self.generate(self.model.chat_ids(messages), **gen)

    def forward(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] of `ids` appended to the cache (no steering)."""
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        out = self.engine.forward(np.asarray(ids, dtype=np.int64))
        self.ids += ids
        self._keys += [""] * len(ids)
        return out


def parse_steering(state: Steering, steering) -> list[SteeringEntry]:
    """Per-call steering requests → validated entries (ValueError names what is wrong)."""
    if steering is None:
        return []
    if isinstance(steering, (dict, SteeringEntry)):
        steering = [steering]
    out = []
    for i, item in enumerate(steering):
        if isinstance(item, SteeringEntry):
            out.append(item)
            continue
        if not isinstance(item, dict) or "vector" not in item:
            raise ValueError(f"steering[{i}] must be an object with a 'vector'")
        unknown = set(item) - {"vector", "scale", "layers", "mode", "apply_to"}
        if unknown:
            raise ValueError(f"steering[{i}] has unknown field(s) {sorted(unknown)}")
        try:
            out.append(state.make_entry(item["vector"], item.get("scale", 1.0), item.get("layers"),
                                        item.get("mode", "add"), item.get("apply_to", "all")))
        except ValueError as e:
            raise ValueError(f"steering[{i}]: {e}") from None
    return out


def steering_key(state: Steering, generated: bool) -> str:
    """A fingerprint of the steering one phase runs under ("" for none): cached tokens are reused
    only under the same steering, since steering changes every later layer's keys and values."""
    inputs = state.layer_inputs(generated)
    if not inputs:
        return ""
    h = hashlib.blake2b(digest_size=16)
    for layer, (add, ablate) in sorted(inputs.items()):
        h.update(layer.to_bytes(4, "little"))
        for a in (add, ablate):
            h.update(b"-" if a is None else np.ascontiguousarray(a, np.float32).tobytes() + b"|")
    return h.hexdigest()
