"""Streaming detokenization (StreamDecoder) against a full decode, on a byte-level BPE tokenizer
(SmolLM2's) and a SentencePiece one with byte fallback and '▁' spaces (llama 2's)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.tokenizer import StreamDecoder, TextTokenizer

TEXTS = [
    "héllo wörld — 日本語のテキスト 🙂🚀👩‍💻 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
    "  two leading spaces, then\nnew lines\n\n\tand a tab; naïve café, Straße, Ελληνικά, русский",
    "Cocinașășo: Índres cuadru… ✨✨✨ 1,000,000 ≈ 10⁶",
]


def _tokenizer(tmp_path, tokenizer_json: str) -> TextTokenizer:
    (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    return TextTokenizer(tmp_path, {"config": {}, "tokenizer": {"file": "tokenizer.json"}})


@pytest.fixture(scope="module", params=["smollm2-bpe", "llama2-sentencepiece"])
def tok(request, tmp_path_factory):
    from edgeact.converters.readers import tokenizer_convert as tc

    shared = request.getfixturevalue("smollm2_gguf" if request.param == "smollm2-bpe" else "llama2_tokenizer_dir")
    pytest.importorskip("transformers")
    if request.param == "smollm2-bpe":
        pytest.importorskip("gguf")
        text = tc.gguf_tokenizer_json(shared, add_bos_token=False)
    else:
        pytest.importorskip("sentencepiece")
        text = tc.llama2c_tokenizer_json(shared / "tokenizer.bin")
    return _tokenizer(tmp_path_factory.mktemp(request.param), text)


def _stream(tok, ids):
    dec = StreamDecoder(tok)
    pieces, window = [], 0
    for i in ids:
        pieces.append(dec.push(i))
        window = max(window, len(dec.ids))
    pieces.append(dec.finish())
    return pieces, window


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_full_decode(tok, text):
    ids = tok.encode_ids(text, add_special_tokens=False)
    pieces, window = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and tok.decode(ids).strip() == text.strip()
    assert all("\ufffd" not in p for p in pieces)
    # each push decodes a few tokens, not the whole sequence (the longest character here is 4 UTF-8 bytes,
    # the emoji ZWJ sequence 11 byte tokens at most)
    assert window <= 12 < len(ids)


def test_random_token_sequences_stream_like_the_full_decode(tok):
    """Sampled gibberish, with broken UTF-8 byte tokens in the middle and at the end."""
    rng = np.random.default_rng(0)
    vocab = tok._tok.get_vocab_size()
    for _ in range(40):
        ids = [int(i) for i in rng.integers(0, vocab, size=int(rng.integers(1, 60)))]
        pieces, _ = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
