"""What loading a tokenizer leaves resident: tokenizers parses tokenizer.json through intermediate
JSON trees several times the size of the tokenizer it builds, and edgeact hands their freed pages
back and reads the tokenizer before the weights, so that transient neither stays resident nor
stacks on top of the weights."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
from pathlib import Path
def status():
    d = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            d[line.split(":")[0]] = int(line.split()[1]) * 1024
    return d
from edgeact.tokenizer import TextTokenizer
before = status()
tok = TextTokenizer(Path(sys.argv[1]), {"config": {}})
after = status()
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"before": before, "after": after, "trimmed": status(),
                  "roundtrip": tok.decode(tok.encode_ids("abc cab"))}))
"""


def _bpe_json(n_merges: int) -> str:
    """A byte-fallback BPE tokenizer.json (Gemma's layout) with n_merges merges over 3-letter
    alphabet words: big enough that its parse trees dwarf the interpreter."""
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁" + alphabet:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for a in alphabet:
        for b in alphabet:
            vocab.setdefault(a + b, len(vocab))
            merges.append([a, b])
    i = 0
    while len(merges) < n_merges:
        a, b, c = alphabet[i % 26], alphabet[i // 26 % 26], alphabet[i // 676 % 26]
        left, right = a + b + (c * (1 + i // 17576)), f"{c}{i}"
        for piece in (left, right):
            vocab.setdefault(piece, len(vocab))
        vocab.setdefault(left + right, len(vocab))
        merges.append([left, right])
        i += 1
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in (("<unk>", 0), ("<bos>", 1), ("<eos>", 2))],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges}})


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="reads /proc/self/status; the trim is glibc's")
def test_parse_memory_is_not_left_resident(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(_bpe_json(150_000))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["roundtrip"] == "abc cab"
    peak = r["after"]["VmHWM"] - r["before"]["VmRSS"]
    left = r["after"]["VmRSS"] - r["trimmed"]["VmRSS"]
    assert peak > 60 << 20, f"the parse peaked at only {peak >> 20} MB: too small a tokenizer to tell"
    # freed parse memory a trim after the load still finds: ~20% of the peak when the load keeps it
    assert left < 0.05 * peak, f"{left >> 20} MB of freed parse memory still resident after a {peak >> 20} MB peak"


def test_load_reads_the_tokenizer_before_the_weights(stories_int4_dir, tmp_path, monkeypatch):
    import shutil

    import edgeact
    import edgeact.api as api

    folder = tmp_path / "with-tokenizer"
    shutil.copytree(stories_int4_dir, folder)
    (folder / "tokenizer.json").write_text(_bpe_json(1000))

    order = []
    real_tok, real_engine = api.TextTokenizer, api.make_engine
    monkeypatch.setattr(api, "TextTokenizer", lambda *a, **k: order.append("tokenizer") or real_tok(*a, **k))
    monkeypatch.setattr(api, "make_engine", lambda *a, **k: order.append("engine") or real_engine(*a, **k))
    model = edgeact.load(folder)
    assert order == ["tokenizer", "engine"]
    assert model.detokenize(model.tokenize("abc cab")) == "abc cab"
