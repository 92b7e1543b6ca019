"""convert(): whole model folders, failure hygiene, and the real checkpoints against their references."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import edgeact
from edgeact.converters.convert import convert
from edgeact.converters.model import ConversionError
from edgeact.converters.random_model import random_source
from edgeact.converters.torch_ref import build_torch_model

from test_writer import OrtDecoder, check_against_torch, torch_logits


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def test_folder_and_model_card(tmp_path):
    src = random_source("tiny", tie_word_embeddings=True)
    src.tokenizer_json = '{"version": "1.0"}'
    src.chat_template = "{{ messages }}"
    out = convert(src, tmp_path / "m", quant="int4", group_size=64, symmetric=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["edgeact.json", "model.onnx", "tokenizer.json"]
    card = json.loads((out / "edgeact.json").read_text())
    assert card["format"] == "edgeact-model" and card["format_version"] == 1
    assert card["converter_version"] == edgeact.__version__
    assert card["config"]["hidden_size"] == 48 and card["config"]["tie_word_embeddings"] is True
    assert card["max_context"] == 256
    assert card["quantization"] == {"weights": "int4", "group_size": 64, "symmetric": True, "method": "rtn",
                                    "accuracy_level": 4, "lm_head": "int8", "embedding": "shared",   # tied: one table
                                    "float_zero_point_linears": 0}
    assert card["steering"] == {"layers": 2, "inputs": "steer.{i}.add / steer.{i}.ablate"}
    assert card["tokenizer"]["file"] == "tokenizer.json" and card["tokenizer"]["chat_template"] == "{{ messages }}"
    assert card["tokenizer"]["eos_token_ids"] == [2]
    assert card["source"]["format"] == "random"
    assert _leftovers(tmp_path, "m") == ["m"]


def test_overwrite(tmp_path):
    convert(random_source("tiny"), tmp_path / "m", quant="fp16", progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        convert(random_source("tiny"), tmp_path / "m", quant="fp32", progress=False)
    assert json.loads((tmp_path / "m" / "edgeact.json").read_text())["quantization"]["weights"] == "fp16"
    convert(random_source("tiny"), tmp_path / "m", quant="fp32", progress=False, overwrite=True, max_context=64)
    card = json.loads((tmp_path / "m" / "edgeact.json").read_text())
    assert card["quantization"]["weights"] == "fp32" and card["max_context"] == 64
    assert _leftovers(tmp_path, "m") == ["m"]


def _missing_tensor():
    src = random_source("tiny")
    src.tensors = {k: v for k, v in src.tensors.items() if "layers.1.mlp.up_proj" not in k}
    return src


@pytest.mark.parametrize("make_src,kw,msg", [
    (lambda: random_source("tiny"), dict(quant="int3"), "unknown quant 'int3'"),
    (lambda: random_source("tiny"), dict(group_size=48), "group size 48"),
    (lambda: random_source("tiny"), dict(lm_head="q4"), "unknown lm_head"),
    (lambda: random_source("tiny"), dict(embedding="int4"), "unknown embedding"),
    (lambda: random_source("tiny", arch="gpt2"), {}, "unsupported architecture 'gpt2'"),
    (lambda: random_source("tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), {}, "rope_scaling"),
    (_missing_tensor, {}, "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda: "/nonexistent/model.gguf", {}, "does not exist"),
])
def test_bad_input_leaves_no_folder(tmp_path, make_src, kw, msg):
    with pytest.raises(ConversionError, match=msg) as e:
        convert(make_src(), tmp_path / "out", progress=False, **kw)
    assert "\n" not in str(e.value)
    assert _leftovers(tmp_path, "out") == []


def test_interrupted_write_leaves_no_folder(tmp_path):
    src = random_source("tiny")
    def boom():
        raise KeyboardInterrupt
    src.tensors = {**src.tensors, "model.norm.weight": boom}
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []


# --- real checkpoints (the readers land in edgeact.converters.readers) ----------------------------------

def test_stories260k_fp32_matches_torch(stories_fp32_dir, stories260k):
    from edgeact.converters.readers import read_source

    src = read_source(stories260k)
    card = json.loads((stories_fp32_dir / "edgeact.json").read_text())
    assert card["source"]["format"].startswith("llama2c") and card["config"]["num_layers"] == 5
    prompt = np.random.default_rng(0).integers(3, 512, 32).tolist()
    check_against_torch(stories_fp32_dir, build_torch_model(src), prompt, steps=16, tol=1e-3)


@pytest.mark.slow
def test_smollm2_fp32_matches_transformers_gguf_load(smollm2_fp32_dir, smollm2_hf):
    card = json.loads((smollm2_fp32_dir / "edgeact.json").read_text())
    assert card["tokenizer"]["chat_template"] and (smollm2_fp32_dir / "tokenizer.json").is_file()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_fp32_dir / "tokenizer.json"))
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is", add_special_tokens=False).ids
    tokens, logits = OrtDecoder(smollm2_fp32_dir / "model.onnx").greedy(prompt, 8)
    ref = torch_logits(smollm2_hf, prompt + tokens)
    err = float(np.abs(logits - ref).max())
    assert err <= 1e-3, f"max |Δlogit| {err}"
    assert tokens == [int(r.argmax()) for r in ref[len(prompt) - 1:-1]]


def test_random_source_is_lazy_deterministic_and_shaped():
    a, b = random_source("tinyllama-1.1b", seed=1), random_source("tinyllama-1.1b", seed=1)
    c = a.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == \
        (2048, 22, 32, 4, 5632, 32000)
    name = "model.layers.21.self_attn.k_proj.weight"
    w = a.load(name)
    assert w.shape == (256, 2048) and np.array_equal(w, b.load(name))
    assert not np.array_equal(w, random_source("tinyllama-1.1b", seed=2).load(name))
    assert abs(float(w.std()) - 2048 ** -0.5) < 1e-3
    assert abs(float(a.load("model.norm.weight").mean()) - 1.0) < 0.02
    tiny = random_source(random_source("tiny").config, tie_word_embeddings=True)
    assert not tiny.has("lm_head.weight") and tiny.config.hidden_size == 48
    with pytest.raises(ConversionError, match="unknown random shape"):
        random_source("gpt-5")
