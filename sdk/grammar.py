"""JSON-schema constrained decoding through llguidance (docs/serving.md says why this engine).

Before each sampling step the matcher gives the set of tokens that keep the output a valid
prefix of a value matching the schema; every other logit becomes -inf. When the value is
complete the matcher allows only end-of-sequence, and generation stops there.
"""
from __future__ import annotations

import json
import threading
import weakref

import numpy as np

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # per Model, dropped with it
_LOCK = threading.Lock()


def _ll_tokenizer(model):
    """llguidance's view of the model's tokenizer (built once per model: about a second for 50k tokens)."""
    from edgeact.extras import require

    llguidance = require("llguidance", "JSON-schema output")

    with _LOCK:
        tok = _TOKENIZERS.get(model)
        if tok is None:
            if model.tokenizer is None:
                raise ValueError(f"{model.folder} has no tokenizer: JSON-schema output needs one")
            eos = sorted(model.eos_token_ids)
            if not eos:
                raise ValueError(f"{model.folder} declares no end-of-sequence token: JSON-schema output needs one")
            tok = _TOKENIZERS[model] = llguidance.LLTokenizer(model.tokenizer._tok.to_str(),
                                                              n_vocab=model.engine.vocab_size, eos_token=eos)
        return tok


def check_schema(schema) -> dict:
    """A JSON schema as a dict (from a dict or a JSON string); ValueError when it is not one."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return schema


def read_schema_file(path) -> dict:
    """A JSON schema from a file (for --json-schema), with a one-line error."""
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the JSON schema {path}: {e}") from None
    try:
        return check_schema(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class JsonSchemaConstraint:
    """Token masks that keep generation inside a JSON schema (one per generation)."""

    def __init__(self, model, schema):
        schema = check_schema(schema)
        tok = _ll_tokenizer(model)
        import llguidance
        from llguidance.numpy import allocate_token_bitmask

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise ValueError(f"JSON schema rejected: {e}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise ValueError(f"JSON schema rejected: {messages[0] if messages else 'invalid'}")
        self.matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"JSON schema rejected: {self.matcher.get_error()}")
        self.vocab = model.engine.vocab_size
        self._bits = allocate_token_bitmask(1, self.vocab)

    def allowed(self) -> np.ndarray:
        """Boolean [vocab]: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        # unpackbits returns a fresh array of 0/1 bytes: viewed as bool, not copied again each token
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab].view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        allowed = self.allowed()
        if not allowed.any():
            raise RuntimeError(f"JSON schema: no token can continue the output ({self.matcher.get_error()})")
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~allowed[: out.shape[-1]]] = -np.inf
        return out

    def accept(self, tok: int) -> None:
        if not self.matcher.consume_token(int(tok)):
            raise RuntimeError(f"JSON schema: token {tok} rejected ({self.matcher.get_error()})")

    @property
    def done(self) -> bool:
        """The value is complete (only end-of-sequence could follow)."""
        return self.matcher.is_stopped()
