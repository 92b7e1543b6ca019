"""The ONNX writer: the graph of docs/model-folder.md run by onnxruntime against transformers (torch_ref)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeact import contract
from edgeact.converters.model import ConversionError, ModelConfig
from edgeact.converters.onnx_writer import ALIGN, DATA_FILE, write_onnx
from edgeact.converters.quantize import dequantize, quantize_blockwise
from edgeact.converters.random_model import SHAPES, random_source
from edgeact.converters.rope_cache import inv_freq
from edgeact.converters.torch_ref import build_torch_model, hf_config

ort = pytest.importorskip("onnxruntime")

NATIVE_OPS = contract.OPS   # the op names a folder may use (edgeact.contract)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


class OrtDecoder:
    """Drives a model folder's graph in onnxruntime: prefill, then decode through the KV cache (present → past)."""

    def __init__(self, model_path, extra_outputs=()):
        so = ort.SessionOptions()
        so.log_severity_level = 3   # the steer initializers-as-inputs warning is intended
        path = str(model_path)
        if extra_outputs:
            m = onnx.load(path)
            for name in extra_outputs:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            path = m.SerializeToString()
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.n_layers = sum(1 for i in self.sess.get_inputs() if i.name.endswith(".key"))
        kv = next(i for i in self.sess.get_inputs() if i.name == "past_key_values.0.key").shape
        self.n_kv, self.head_dim = kv[1], kv[3]
        self.reset()

    def reset(self):
        empty = np.zeros((1, self.n_kv, 0, self.head_dim), np.float32)
        self.past = {f"past_key_values.{i}.{kv}": empty for i in range(self.n_layers) for kv in ("key", "value")}
        self.pos = 0

    def step(self, ids, **extra) -> dict:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        total = self.pos + ids.shape[1]
        feeds = {"input_ids": ids, "seqlens_k": np.array([total - 1], np.int32),
                 "total_sequence_length": np.array(total, np.int32), **self.past, **extra}
        names = [o.name for o in self.sess.get_outputs()]
        out = dict(zip(names, self.sess.run(names, feeds)))
        for i in range(self.n_layers):
            for kv in ("key", "value"):
                self.past[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
        self.pos = total
        return out

    def greedy(self, prompt, steps: int):
        """Prefill `prompt`, then `steps` greedy single-token steps; returns (tokens, logits of each position)."""
        self.reset()
        logits = [self.step(prompt)["logits"][0]]
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[-1][-1].argmax()))
            logits.append(self.step([tokens[-1]])["logits"][0])
        return tokens, np.concatenate(logits)


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def check_against_torch(model_dir, torch_model, prompt, steps=16, tol=1e-3):
    """ORT prefill + KV-cache decode vs torch on the full sequence: logits within tol, same greedy tokens."""
    tokens, logits = OrtDecoder(model_dir / "model.onnx").greedy(prompt, steps)
    ref = torch_logits(torch_model, list(prompt) + tokens)
    ref_tokens = []
    seq = list(prompt)
    for _ in range(steps):
        ref_tokens.append(int(torch_logits(torch_model, seq)[-1].argmax()))
        seq.append(ref_tokens[-1])
    assert logits.shape == ref.shape
    err = float(np.abs(logits - ref).max())
    assert err <= tol, f"max |Δlogit| {err} > {tol}"
    assert tokens == ref_tokens
    return err


def _prompt(vocab, n=32, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


CONFIGS = {
    "gqa-ragged-untied": dict(),
    "tied": dict(tie_word_embeddings=True),
    "qwen2-bias": dict(arch="qwen2", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6),
    "llama3-rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, num_kv_heads=3),
    # head_dim 8 and 24: the graph pads heads to a multiple of 16 for onnxruntime's GQA.
    "head-dim-8": dict(num_heads=6, num_kv_heads=2, head_dim=8, arch="qwen2", attention_bias=True),
    "head-dim-24": dict(num_heads=2, num_kv_heads=1, head_dim=24),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_torch_through_kv_cache(tmp_path, name):
    src = random_source("tiny", seed=3, **CONFIGS[name])
    write_onnx(src, tmp_path, quant="fp32", progress=False)
    check_against_torch(tmp_path, build_torch_model(src), _prompt(src.config.vocab_size))


def test_cached_greedy_equals_full_recompute(tmp_path):
    src = random_source("tiny", seed=5)
    write_onnx(src, tmp_path, quant="fp32", progress=False)
    dec = OrtDecoder(tmp_path / "model.onnx")
    prompt = _prompt(src.config.vocab_size, 12, seed=2)
    tokens, _ = dec.greedy(prompt, 10)
    seq = list(prompt)
    for _ in range(10):
        dec.reset()
        seq.append(int(dec.step(seq)["logits"][0, -1].argmax()))
    assert seq[len(prompt):] == tokens


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}, None])
def test_rope_inv_freq_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(**{**SHAPES["tiny"].to_dict(), "rope_scaling": rope, "rope_theta": 500000.0})
    kind = (rope or {}).get("rope_type", "default")
    ref, factor = ROPE_INIT_FUNCTIONS[kind](hf_config(cfg), "cpu")
    assert factor == 1.0
    np.testing.assert_allclose(inv_freq(cfg), ref.double().numpy(), rtol=1e-6)


def test_unsupported_rope_type_is_a_conversion_error(tmp_path):
    src = random_source("tiny", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConversionError, match="rope_scaling type 'yarn'"):
        write_onnx(src, tmp_path, quant="fp32", progress=False)


# Quantized files against the fp32 file: relative RMS error of the logits over a 24-token prefill
# + 8 decode steps (measured on this model: fp16 8e-4, int8 0.025, int4 0.23-0.26).
@pytest.mark.parametrize("quant,kw,tol", [("fp16", {}, 3e-3), ("int8", {}, 0.05),
                                          ("int4", {}, 0.35), ("int4", {"symmetric": True, "group_size": 16}, 0.35)])
def test_quantized_close_to_fp32(tmp_path, quant, kw, tol):
    src = random_source("tiny", seed=7, hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=200)
    write_onnx(src, tmp_path / "fp32", quant="fp32", progress=False)
    write_onnx(src, tmp_path / quant, quant=quant, progress=False, **kw)
    prompt = _prompt(src.config.vocab_size, 24)
    ref_tokens, ref = OrtDecoder(tmp_path / "fp32" / "model.onnx").greedy(prompt, 8)
    dec = OrtDecoder(tmp_path / quant / "model.onnx")
    # Feed the fp32 model's tokens so both see the same sequence.
    logits = np.concatenate([dec.step(prompt)["logits"][0]] + [dec.step([t])["logits"][0] for t in ref_tokens])
    rel = np.sqrt(np.mean((logits - ref) ** 2) / np.mean(ref ** 2))
    print(f"{quant} {kw}: relative RMS logit error {rel:.5f}")
    assert rel < tol, f"{quant}: relative RMS logit error {rel:.4f} >= {tol}"


def _graph_ops(model):
    return [(n.domain, n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8", "int4"])
def test_graph_follows_contract(tmp_path, quant):
    src = random_source("tiny", arch="qwen2", attention_bias=True, tie_word_embeddings=True)
    facts = write_onnx(src, tmp_path, quant=quant, progress=False)
    m = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(m)
    assert {(o.domain, o.version) for o in m.opset_import} == {("", 23), ("com.microsoft", 1), ("ai.edgeact", 1)}
    assert set(_graph_ops(m)) <= NATIVE_OPS
    assert [f.name for f in m.functions] == ["Steer"]
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and "layers.1.attn.q_proj" in names and "lm_head" in names
    steer_outs = [n.output[0] for n in m.graph.node if n.op_type == "Steer"]
    assert steer_outs == ["hidden.0", "hidden.1"]
    inputs = {i.name: i for i in m.graph.input}
    ablate = inputs["steer.0.ablate"].type.tensor_type.shape.dim
    assert ablate[0].dim_param == "R0" and ablate[1].dim_value == 48
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2)
                                                             for kv in ("key", "value")]
    inits = {t.name: t for t in m.graph.initializer}
    assert onnx.numpy_helper.to_array(inits["cos_cache"]).shape == (256, 8)
    # Tied: a quantized lm_head's table is the lookup's too (shared); float weights keep a float table
    if quant in ("int4", "int8"):
        assert facts["quantization"]["embedding"] == "shared" and "model.embed_tokens.weight" not in inits
        assert next(n for n in m.graph.node if n.name == "embed").op_type == "GatherBlockQuantized"
    else:
        assert inits["model.embed_tokens.weight"].data_type == (onnx.TensorProto.FLOAT if quant == "fp32"
                                                                else onnx.TensorProto.FLOAT16)
    lm = next(n for n in m.graph.node if n.name == "lm_head")
    assert lm.op_type == {"fp32": "MatMul", "fp16": "MatMul", "int8": "MatMulNBits", "int4": "MatMulNBits"}[quant]
    if quant in ("int4", "int8"):
        assert {a.name: a.i for a in lm.attribute}["bits"] == 8   # lm_head defaults to int8
        q = next(n for n in m.graph.node if n.name == "layers.0.attn.q_proj")
        attrs = {a.name: a.i for a in q.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (int(quant[3:]), 32, 48, 48)
    assert sum(n.op_type == "Add" and n.name.endswith(".bias") for n in m.graph.node) == 6
    assert facts["quantization"]["weights"] == quant


def test_external_data_is_64_byte_aligned_and_identical(tmp_path):
    src = random_source("tiny", seed=2)
    facts = write_onnx(src, tmp_path / "ext", quant="int4", external_data=True, progress=False)
    write_onnx(src, tmp_path / "inline", quant="int4", progress=False)
    assert facts["external_data"]
    path = tmp_path / "ext" / "model.onnx"
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path), load_external_data=False)
    size = (tmp_path / "ext" / DATA_FILE).stat().st_size
    assert len(m.graph.initializer) > 0
    for t in m.graph.initializer:
        assert t.data_location == onnx.TensorProto.EXTERNAL
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == DATA_FILE
        assert int(info["offset"]) % ALIGN == 0 and int(info["offset"]) + int(info["length"]) <= size
    prompt = _prompt(src.config.vocab_size, 10)
    _, a = OrtDecoder(path).greedy(prompt, 4)
    _, b = OrtDecoder(tmp_path / "inline" / "model.onnx").greedy(prompt, 4)
    np.testing.assert_array_equal(a, b)


def test_steer_node_semantics(tmp_path):
    src = random_source("tiny", seed=4)
    write_onnx(src, tmp_path, quant="fp32", progress=False)
    dec = OrtDecoder(tmp_path / "model.onnx", extra_outputs=["layers.0.mlp.residual", "hidden.0"])
    prompt = _prompt(src.config.vocab_size, 6)
    plain = dec.step(prompt)
    assert np.array_equal(plain["hidden.0"], plain["layers.0.mlp.residual"])   # zero steering is exact
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 48)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    add = rng.standard_normal(48).astype(np.float32)
    dec.reset()
    out = dec.step(prompt, **{"steer.0.add": add, "steer.0.ablate": a})
    h = out["layers.0.mlp.residual"]
    np.testing.assert_allclose(out["hidden.0"], h - (h @ a.T) @ a + add, rtol=1e-5, atol=1e-5)


def test_linear_override_uses_given_weights(tmp_path):
    src = random_source("tiny", seed=6)
    name = "model.layers.1.mlp.down_proj.weight"
    qw = quantize_blockwise(src.load(name), bits=8, block_size=64, symmetric=True)
    write_onnx(src, tmp_path / "ovr", quant="fp32", progress=False, linear_override={name: qw}, method="test",
              accuracy_level=0)   # fp32 math, so the comparison is tight
    m = onnx.load(str(tmp_path / "ovr" / "model.onnx"))
    node = next(n for n in m.graph.node if n.name == "layers.1.mlp.down_proj")
    assert node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["block_size"] == 64
    # Same as an fp32 model whose down_proj holds the dequantized override.
    deq = dequantize(qw)
    ref_src = random_source("tiny", seed=6)
    ref_src.tensors = {**ref_src.tensors, name: lambda: deq}
    write_onnx(ref_src, tmp_path / "ref", quant="fp32", progress=False)
    prompt = _prompt(300, 8)
    _, a = OrtDecoder(tmp_path / "ovr" / "model.onnx").greedy(prompt, 3)
    _, b = OrtDecoder(tmp_path / "ref" / "model.onnx").greedy(prompt, 3)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_no_steering_still_names_hidden_states(tmp_path):
    src = random_source("tiny")
    facts = write_onnx(src, tmp_path, quant="fp32", progress=False, steering=False)
    m = onnx.load(str(tmp_path / "model.onnx"))
    assert facts["steering"] is None and not m.functions
    assert "hidden.1" in {o for n in m.graph.node for o in n.output}
    assert not any(i.name.startswith("steer.") for i in m.graph.input)


def test_chunked_prefill_through_cache_equals_one_prefill(tmp_path):
    src = random_source("tiny", seed=8)
    write_onnx(src, tmp_path, quant="fp32", progress=False)
    dec = OrtDecoder(tmp_path / "model.onnx")
    ids = _prompt(src.config.vocab_size, 15)
    full = dec.step(ids)["logits"][0]
    dec.reset()
    chunks = np.concatenate([dec.step(ids[:10])["logits"][0], dec.step(ids[10:])["logits"][0]])
    np.testing.assert_allclose(chunks, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8", "int4"])
def test_size_estimate_tracks_written_bytes(tmp_path, quant):
    # The estimate decides external data before anything is written; it must not undershoot much.
    from edgeact.converters.onnx_writer import default_embedding, default_lm_head, estimate_bytes

    src = random_source("tiny", hidden_size=128, num_heads=8, num_kv_heads=2, intermediate_size=256)
    facts = write_onnx(src, tmp_path, quant=quant, progress=False, max_context=64)
    est = estimate_bytes(src, quant, 32, default_lm_head(quant), default_embedding(quant), 64)
    assert 0.9 <= est / facts["weight_bytes"] <= 1.2
