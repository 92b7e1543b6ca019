"""Tokenizers of source formats → Hugging Face `tokenizer.json` strings.

Both routes reuse transformers' own converters (GGUF metadata → fast tokenizer;
SentencePiece proto → LlamaTokenizerFast) instead of re-implementing BPE rules.
The written tokenizer.json adds BOS in its post-processor exactly when the
source says add_bos_token, so `encode(text)` with special tokens matches the
source's runtime (llama.cpp / sentencepiece + BOS).
"""
from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np

from ..model import ConversionError

BOS_PIECE, EOS_PIECE, UNK_PIECE = "<s>", "</s>", "<unk>"


_FAST_CLASSES = {"gemma2": "GemmaTokenizerFast", "gemma3_text": "GemmaTokenizerFast", "gemma3": "GemmaTokenizerFast",
                 "qwen2": "Qwen2TokenizerFast", "qwen3": "Qwen2TokenizerFast"}


def gguf_tokenizer_json(path: str | Path, add_bos_token: bool, reader=None) -> str:
    """The tokenizer embedded in a GGUF file, converted as `AutoTokenizer(gguf_file=...)` does
    (reader: the file's open gguf.GGUFReader, when the caller has one)."""
    import transformers
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS, convert_gguf_tokenizer

    arch, tokenizer, tokenizer_config = _gguf_tokenizer_fields(reader if reader is not None else _reader(path))
    if arch not in GGUF_TO_FAST_CONVERTERS:
        raise ConversionError(f"{path}: no tokenizer converter for GGUF architecture {arch!r}")
    fast, extra = convert_gguf_tokenizer(arch, tokenizer)
    kwargs = {**tokenizer_config, **extra, "add_bos_token": add_bos_token, "add_eos_token": False}
    # the class AutoTokenizer picks for the architecture; it also registers the special
    # tokens as added tokens and builds the BOS post-processor.
    cls = getattr(transformers, _FAST_CLASSES.get(arch, "LlamaTokenizerFast"))
    return cls(tokenizer_object=fast, **kwargs).backend_tokenizer.to_str()


def _reader(path: str | Path):
    from .gguf_reader import open_reader

    return open_reader(path)


def _gguf_tokenizer_fields(reader) -> tuple[str, dict, dict]:
    """(model type, tokenizer, tokenizer_config) as transformers' load_gguf_checkpoint reads them,
    with its own tables and value parser, from a reader already open: load_gguf_checkpoint takes
    a path and would parse the file's metadata (the whole vocabulary) a second time."""
    from transformers.integrations.ggml import _gguf_parse_value
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    def value(field):
        v = [_gguf_parse_value(field.parts[i], field.types) for i in field.data]
        return v[0] if len(v) == 1 else v

    parts = {"tokenizer": {}, "tokenizer_config": {}}
    for key, field in reader.fields.items():
        prefix, _, rest = key.partition(".")
        if prefix != "tokenizer":
            continue
        for part, out in parts.items():
            renamed = GGUF_TO_TRANSFORMERS_MAPPING[part]["tokenizer"].get(rest)
            if renamed is not None and renamed != -1:
                out[renamed] = value(field)
    arch = value(reader.fields["general.architecture"])
    return ("gemma3_text" if arch == "gemma3" else arch), parts["tokenizer"], parts["tokenizer_config"]


def read_llama2c_vocab(path: str | Path) -> list[tuple[bytes, float]]:
    """(piece bytes, score) per token from a llama2.c tokenizer.bin."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise ConversionError(f"{path}: too short for a llama2.c tokenizer.bin ({len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len < 1 << 16:
        raise ConversionError(f"{path}: not a llama2.c tokenizer.bin (max_token_length {max_len})")
    off, vocab = 4, []
    while off < len(data):
        if off + 8 > len(data):
            raise ConversionError(f"{path}: truncated llama2.c tokenizer.bin at byte {off}")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 <= n <= max_len or off + n > len(data):
            raise ConversionError(f"{path}: bad token length {n} at byte {off - 4} of llama2.c tokenizer.bin")
        vocab.append((data[off:off + n], score))
        off += n
    return vocab


def _is_byte_piece(p: str) -> bool:
    return len(p) == 6 and p.startswith("<0x") and p.endswith(">")


def llama2c_sentencepiece_proto(vocab: list[tuple[bytes, float]]) -> bytes:
    """A serialized SentencePiece BPE ModelProto equivalent to the one llama2.c exported from.

    llama2.c's export replaced '▁' by ' ' and wrote BOS/EOS as '\\n<s>\\n'/'\\n</s>\\n';
    this undoes both and restores the Llama 2 trainer/normalizer settings.
    """
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()  # the generated module matching the installed protobuf

    if len(vocab) < 3:
        raise ConversionError(f"llama2.c vocabulary has {len(vocab)} tokens; expected <unk>, <s>, </s> first")
    m = pb.ModelProto()
    T = pb.ModelProto.SentencePiece.Type
    for i, (raw, score) in enumerate(vocab):
        piece = {0: UNK_PIECE, 1: BOS_PIECE, 2: EOS_PIECE}.get(i) or raw.decode("utf-8").replace(" ", "▁")
        kind = T.UNKNOWN if i == 0 else T.CONTROL if i in (1, 2) else T.BYTE if _is_byte_piece(piece) else T.NORMAL
        m.pieces.add(piece=piece, score=score, type=kind)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(vocab)
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = UNK_PIECE, BOS_PIECE, EOS_PIECE
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def llama2c_tokenizer_json(path: str | Path, add_bos_token: bool = True) -> str:
    """A llama2.c tokenizer.bin as a Hugging Face tokenizer.json (Llama SentencePiece BPE semantics)."""
    from transformers import LlamaTokenizerFast

    proto = llama2c_sentencepiece_proto(read_llama2c_vocab(path))
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "tokenizer.model"
        model_file.write_bytes(proto)
        # legacy=True keeps sentencepiece's exact handling of spaces (prepend + replace).
        tok = LlamaTokenizerFast(vocab_file=str(model_file), from_slow=True, legacy=True, add_prefix_space=True,
                                 add_bos_token=add_bos_token, add_eos_token=False)
        return tok.backend_tokenizer.to_str()


def gguf_sentencepiece_proto(path: str | Path, escape_space_pieces: bool = False, reader=None) -> bytes:
    """The SentencePiece BPE ModelProto a Gemma GGUF's vocabulary came from (pieces, scores, types as stored).

    transformers' GGUF route builds a Unigram model over these scores, which splits words
    into pieces SentencePiece's BPE never produces ("▁world" as "▁w" "or" "ld"); the proto lets
    sentencepiece itself and transformers' GemmaConverter (BPE merges ordered by score) run as
    on the original tokenizer.model.

    Gemma's whitespace runs are user-defined pieces stored with spaces: transformers' converter
    makes them added tokens matched in the raw text, which is sentencepiece's behaviour for the
    same pieces written with '▁' (escape_space_pieces=True, for sentencepiece itself).
    """
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    reader = reader if reader is not None else _reader(path)
    f = {k: reader.fields.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type")}
    if any(v is None for v in f.values()):
        raise ConversionError(f"{path}: GGUF vocabulary lacks tokens, scores or token types")
    m = pb.ModelProto()
    tok, parts = f["tokens"].data, f["tokens"].parts
    scores = np.asarray(f["scores"].contents(), np.float32)
    types = np.asarray(f["token_type"].contents(), np.int32)
    for i in range(len(tok)):
        piece = bytes(parts[tok[i]]).decode("utf-8")
        if escape_space_pieces and piece and piece.strip(" ") == "":
            piece = "▁" * len(piece)
        m.pieces.add(piece=piece, score=float(scores[i]), type=int(types[i]))
    ids = {k: reader.fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    ids = {k: -1 if v is None else int(v.contents()) for k, v in ids.items()}
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(m.pieces)
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    for key, i in (("unk_piece", ids["unknown"]), ("bos_piece", ids["bos"]), ("eos_piece", ids["eos"]),
                   ("pad_piece", ids["padding"])):
        if i >= 0:
            setattr(ts, key, m.pieces[i].piece)
    add_prefix = reader.fields.get("tokenizer.ggml.add_space_prefix")
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(add_prefix.contents()) if add_prefix is not None else False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def gguf_gemma_tokenizer_json(path: str | Path, add_bos_token: bool, reader=None) -> str:
    """A Gemma GGUF's vocabulary as the tokenizer.json transformers makes from Gemma's tokenizer.model."""
    from transformers import GemmaTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "tokenizer.model"
        model_file.write_bytes(gguf_sentencepiece_proto(path, reader=reader))
        tok = GemmaTokenizerFast(vocab_file=str(model_file), from_slow=True, add_bos_token=add_bos_token,
                                 add_eos_token=False)
        return tok.backend_tokenizer.to_str()
