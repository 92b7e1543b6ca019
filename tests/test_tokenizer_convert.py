"""llama2.c tokenizer.bin → tokenizer.json, checked against sentencepiece on the original tokenizer.model."""
from __future__ import annotations

import pytest

from edgeact.converters.model import ConversionError
from edgeact.converters.readers.tokenizer_convert import (
    llama2c_sentencepiece_proto, llama2c_tokenizer_json, read_llama2c_vocab)

spm = pytest.importorskip("sentencepiece")

SAMPLES = [
    "Hello, world!",
    "Once upon a time, there was a little girl named Lily.",
    "The year 2024 had 366 days; 3.14159 ≈ π, and 1,000,000 > 999.",
    "  two leading spaces, three trailing   ",
    "multiple     inner    spaces",
    "line one\nline two\n\n\tindented with a tab\r\n",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, русский",
    "emojis 🙂🚀👩‍💻 and rare chars 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
    "punctuation!!! ??? ... --- (brackets) [x] {y} <tag> \"quotes\" 'single' `code`",
    " ",
    "",
    "x",
]


@pytest.fixture(scope="module")
def converted(llama2_tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(llama2c_tokenizer_json(llama2_tokenizer_dir / "tokenizer.bin"))


@pytest.fixture(scope="module")
def reference(llama2_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))


def test_pieces_scores_types_equal_original(llama2_tokenizer_dir, reference):
    ours = spm.SentencePieceProcessor(
        model_proto=llama2c_sentencepiece_proto(read_llama2c_vocab(llama2_tokenizer_dir / "tokenizer.bin")))
    assert ours.get_piece_size() == reference.get_piece_size() == 32000
    for i in range(32000):
        assert ours.id_to_piece(i) == reference.id_to_piece(i)
        assert ours.get_score(i) == reference.get_score(i)
        assert (ours.is_byte(i), ours.is_control(i), ours.is_unknown(i)) == \
               (reference.is_byte(i), reference.is_control(i), reference.is_unknown(i))


@pytest.mark.parametrize("text", SAMPLES)
def test_encodings_equal_sentencepiece(converted, reference, text):
    ids = converted.encode(text, add_special_tokens=False).ids
    assert ids == reference.encode(text)
    # add_bos: with special tokens the tokenizer.json prepends <s> (id 1) and nothing else
    assert converted.encode(text).ids == [1] + ids
    assert converted.decode(ids) == reference.decode(ids) == text


def test_special_token_text(converted, reference):
    """Like Hugging Face's Llama tokenizer (unlike sentencepiece), '<s>' in text is the BOS token
    (chat templates rely on this); with special-token parsing off it matches sentencepiece."""
    from tokenizers import Tokenizer

    text = "<s> literal special-looking text </s> <unk>"
    assert converted.encode(text, add_special_tokens=False).ids[0] == 1
    plain = Tokenizer.from_str(converted.to_str())
    plain.encode_special_tokens = True
    assert plain.encode(text, add_special_tokens=False).ids == reference.encode(text)


def test_special_tokens(converted):
    assert [converted.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x0A>")] == [0, 1, 2, 13]


def test_truncated_tokenizer_bin(tmp_path, llama2_tokenizer_dir):
    cut = tmp_path / "tokenizer.bin"
    cut.write_bytes((llama2_tokenizer_dir / "tokenizer.bin").read_bytes()[:10007])
    with pytest.raises(ConversionError, match="truncated|bad token length"):
        read_llama2c_vocab(cut)
