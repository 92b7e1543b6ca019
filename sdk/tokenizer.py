"""Tokenizer and chat template of a model folder (Hugging Face `tokenizers` + jinja2)."""
from __future__ import annotations

import ctypes
from pathlib import Path


def checked_text(text) -> str:
    """`text`, or a ValueError naming the first character no UTF-8 tokenizer can take: a lone
    surrogate, which is how Python carries bytes that were not valid UTF-8 (surrogateescape:
    command-line arguments, os.fsdecode)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        what = f"byte 0x{ord(ch) - 0xdc00:02x}" if "\udc80" <= ch <= "\udcff" else f"lone surrogate U+{ord(ch):04X}"
        raise ValueError(f"text is not valid UTF-8: {what} at character {e.start}") from None
    return text


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    tokenizers parses tokenizer.json through intermediate JSON trees several times the size of
    the tokenizer it builds; glibc keeps their freed pages mapped, so a 262k-token vocabulary
    would leave a few hundred MB of freed parse memory resident for the life of the process."""
    try:
        ctypes.CDLL(None).malloc_trim(0)   # the C library the process already runs on
    except (OSError, AttributeError, TypeError):   # not glibc (musl, macOS; Windows has no CDLL(None))
        pass


class TextTokenizer:
    """tokenizer.json plus the special-token facts edgeact.json records.

    BOS: tokenizer.json's post-processor adds it when the source says so, so
    `encode(text)` already starts with BOS where the model expects one.
    """

    def __init__(self, folder: Path, meta: dict):
        from tokenizers import Tokenizer

        info = meta.get("tokenizer") or {}
        self._tok = Tokenizer.from_file(str(Path(folder) / (info.get("file") or "tokenizer.json")))
        release_freed_heap()
        cfg = meta["config"]
        self.bos_token_id = info.get("bos_token_id", cfg.get("bos_token_id"))
        self.eos_token_ids = list(info.get("eos_token_ids") or cfg.get("eos_token_ids") or [])
        self.chat_template = info.get("chat_template")

    # tokenizers.Tokenizer's Encoding-returning API is what steering's helpers expect
    def encode(self, text: str, add_special_tokens: bool = True):
        return self._tok.encode(checked_text(text), add_special_tokens=add_special_tokens)

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i):
        return self._tok.id_to_token(int(i))

    def token_to_id(self, t):
        return self._tok.token_to_id(t)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template: give the prompt as plain text")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}"[:200])
            if isinstance(m["content"], str):   # other content (parts, None) is the template's to handle
                try:
                    checked_text(m["content"])
                except ValueError as e:   # the position within the message, not within the rendered template
                    raise ValueError(f"message {i} ({m['role']}): {e}") from None
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tok = lambda i: self.id_to_token(i) if i is not None else ""  # noqa: E731
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=tok(self.bos_token_id), eos_token=tok((self.eos_token_ids or [None])[0]))
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None


class StreamDecoder:
    """Incremental detokenization: yields only text that is final, so a UTF-8 character split over
    several byte-fallback tokens comes out whole.

    Each push decodes a short window, not the whole sequence: the tokens already shown that
    precede the pending ones (the context a decoder needs for spaces and merges) plus the pending
    ones. The new text is the window's text minus the text of its shown part."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []   # the window: ids[:shown] already emitted, the rest pending
        self.shown = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more tokens
            return ""
        before = self.tok.decode(self.ids[:self.shown]) if self.shown else ""
        new = text[len(before):] if text.startswith(before) else ""
        # the next window starts at the pending tokens just emitted, which give it its context
        self.ids = self.ids[self.shown:]
        self.shown = len(self.ids)
        return new

    def finish(self) -> str:
        """Text of tokens still pending at the end (an incomplete character shows as U+FFFD, as in a full decode)."""
        if len(self.ids) == self.shown:
            return ""
        text = self.tok.decode(self.ids)
        before = self.tok.decode(self.ids[:self.shown]) if self.shown else ""
        self.ids, self.shown = [], 0
        return text[len(before):] if text.startswith(before) else ""
