"""Activation sparsity, steering, hidden-state capture and `edgeact eval` on the families beside Llama
(Gemma 2/3, Qwen3, Phi-3, Llama 3 rope), on random weights.

Sparsity: per family and method (teal, wina, cats; CATS scores |act(gate)|, GELU-tanh on Gemma),
native equals onnxruntime on the int4 folder (float activations: KL <= 1e-7, the engines differ by
summation order only up to the first score that sits at its threshold), decode equals prefill, and the realized sparsity on
held-out tokens is the target (the graph thresholds the quantity calibration measured).
Steering: the captured hidden state of layer i is transformers' `output_hidden_states[i + 1]` (the
residual stream after Gemma's post-norms, its embedding scale included) on both engines; a vector
added at a layer moves the logits as the same addition after that transformers block does.
Eval: an fp32 folder against its Hugging Face source has KL ~0 on both engines.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeact
from edgeact.converters.calibration import calibration_ids
from edgeact.converters.convert import convert
from edgeact.converters.model import ModelConfig
from edgeact.converters.random_model import random_source
from edgeact.converters.sparsity import calibrate, parse_targets
from edgeact.converters.torch_ref import build_torch_model
from edgeact.engines import native_available
from edgeact.evaluate import compare_logits
from edgeact.steering import compute_vectors, torch_source
from edgeact.sweep import realized_sparsity
from test_sparsity import assert_decode_equals_prefill

pytest.importorskip("onnxruntime")
ENGINES = ["ort", pytest.param("native", marks=pytest.mark.skipif(not native_available(),
                                                                  reason="native runtime not built"))]

GEMMA2 = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=16, rope_theta=10000.0, max_position_embeddings=256, arch="gemma2", hidden_act="gelu_tanh",
                     norm_offset=1.0, embedding_multiplier=8.0, sandwich_norms=True, attention_scale=0.25,
                     sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
SOURCES = {
    "gemma3": lambda: random_source("gemma3-tiny", seed=1),
    "gemma2-softcap": lambda: random_source(GEMMA2, seed=1),
    "qwen3": lambda: random_source("qwen3-tiny", seed=1),
    "phi3-partial": lambda: random_source("tiny", seed=1, arch="phi3", partial_rotary_factor=0.5),
    "llama3-rope": lambda: random_source("tiny", seed=1, rope_theta=5e5, rope_scaling=LLAMA3_ROPE,
                                         tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(SOURCES))
def family(request):
    return request.param, SOURCES[request.param]()


# ---------------------------------------------------------------- activation sparsity

SPARSE_METHODS = ("teal", "wina", "cats")


def first_tie(folder, ids, rel: float = 1e-6) -> int:
    """The first position where a Sparsify score lies within `rel` of its threshold (len(ids) if none).

    There the engines' summation order decides whether the channel is kept; one flipped channel moves
    every later position through attention (Gemma's x8 embedding scale makes it visible: measured KL
    5e-3 from one score 7e-9 from its threshold). Positions before it depend on no tie."""
    import onnx
    from onnx import numpy_helper

    from edgeact.engines.ort_engine import OrtEngine

    m = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type == "Sparsify"]
    outs = OrtEngine(folder).probe(ids, [n.input[0] for n in nodes])
    first = len(ids)
    for n in nodes:
        x = outs[n.input[0]].reshape(len(ids), -1)
        t = inits[n.input[1]]
        near = np.abs(np.abs(x) * inits[n.input[2]] - t) <= rel * np.maximum(t, 1e-30)
        rows = np.nonzero(near.any(-1))[0]
        first = min(first, int(rows[0]) if len(rows) else first)
    return first


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_sparsity_native_equals_onnxruntime(family, method, tmp_path):
    name, src = family
    held_out = calibration_ids(src, n_tokens=192, seed=99)[0]   # calibration samples seeds 1234+
    sp = calibrate(src, method, parse_targets("0.5", method), calib_tokens=512, progress=False)
    folder = convert(src, tmp_path / method, quant="int4", accuracy_level=1, progress=False, sparsity=sp)
    # the graph's Sparsify nodes zero what calibration measured: half of each site on unseen tokens
    r = realized_sparsity(folder, held_out)
    sites = {"cats": {"ffn_act"}}.get(method, {"attn_in", "attn_out", "ffn_in", "ffn_out"})
    assert {s.rsplit(".", 1)[-1] for s in r} == sites and len(r) == len(sites) * src.config.num_layers
    assert abs(np.mean(list(r.values())) - 0.5) <= 0.08, r
    if not native_available():
        return
    # Float activations (accuracy_level 1): before the first tie the engines differ by summation order
    # only (KL measured <= 3e-13 on every family and method; bound 1e-9). Ties within 1e-6 of a
    # threshold do occur in 192 tokens (gemma3 teal flips one at position 133, qwen3 wina one before
    # 64): of three held-out sequences, the one with the longest tie-free prefix is compared.
    ids = max((calibration_ids(src, n_tokens=192, seed=seed)[0] for seed in (99, 98, 97)),
              key=lambda seq: first_tie(folder, seq))
    ids = ids[:first_tie(folder, ids)]
    assert len(ids) >= 48, len(ids)
    ref = edgeact.load(folder, engine="ort").forward(ids)
    nat = edgeact.load(folder, engine="native")
    q = compare_logits(nat.forward(ids), ref, ids)
    print(f"{name} {method}: {len(ids)} positions, KL {q.kl:.1e}")
    assert q.kl <= 1e-9 and q.top1 == 1.0, (name, method, len(ids), q.kl, q.top1)
    assert_decode_equals_prefill(nat.engine, ids)


@pytest.mark.parametrize("shape,act", [("gemma3-tiny", "gelu_tanh"), ("qwen3-tiny", "silu")])
def test_cats_scores_the_models_gate_activation(tmp_path, shape, act):
    """CATS's score is |act(gate)| with the model's own activation: its thresholds are the quantile of
    transformers' act(gate_proj(x)), and the graph's ffn_act Sparsify reads that activation's node."""
    import onnx

    src = random_source(shape, seed=2)
    ids = calibration_ids(src, n_tokens=128, seed=5)
    sp = calibrate(src, "cats", {"ffn": 0.3}, calib_ids=ids, progress=False)
    assert sp["meta"]["score"] == {"gelu_tanh": "|GELU-tanh(gate)|", "silu": "|SiLU(gate)|"}[act]
    model = build_torch_model(src)
    gate_out = {}
    hooks = [layer.mlp.gate_proj.register_forward_hook(lambda m, a, out, i=i: gate_out.setdefault(i, []).append(out))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for row in ids:
            model(torch.from_numpy(row)[None])
    for h in hooks:
        h.remove()
    f = {"gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"), "silu": torch.nn.functional.silu}[act]
    for i in range(src.config.num_layers):
        a = f(torch.cat(gate_out[i]).reshape(-1, src.config.intermediate_size)).abs().double()
        thr = sp["sites"][f"layers.{i}.ffn_act"][0]
        np.testing.assert_allclose(thr, float(torch.quantile(a.reshape(-1), 0.3)), rtol=1e-5)
    folder = convert(src, tmp_path / "cats", quant="int4", progress=False, sparsity=sp)
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    sparsify = [n for n in m.graph.node if n.op_type == "Sparsify"]
    assert len(sparsify) == src.config.num_layers
    want = {"gelu_tanh": "Gelu", "silu": "Mul"}[act]   # SiLU is x·Sigmoid(x) in the graph
    assert all(producer[n.input[0]].op_type == want for n in sparsify)


def test_cli_convert_cats_on_a_gemma3_checkpoint(tmp_path):
    """`edgeact convert HF --sparsity-method cats` on a Gemma 3 folder: CATS on the GELU-tanh gate."""
    import transformers

    from edgeact.cli import main

    cfg = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                        max_position_embeddings=256, query_pre_attn_scalar=32,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    out = tmp_path / "cats"
    assert main(["convert", str(tmp_path / "hf"), "-o", str(out), "--quant", "int4", "--sparsity", "0.4",
                 "--sparsity-method", "cats", "--calib-tokens", "128", "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())["sparsity"]
    assert meta["method"] == "cats" and meta["score"] == "|GELU-tanh(gate)|" and meta["targets"] == {"ffn": 0.4}


# ---------------------------------------------------------------- steering and hidden-state capture

IDS = np.array([2, 17, 5, 9, 22, 4, 31, 8, 15, 40, 3, 11], dtype=np.int64)


@pytest.fixture(scope="module")
def fp32_family(family, tmp_path_factory):
    name, src = family
    return name, src, convert(src, tmp_path_factory.mktemp(name) / "fp32", quant="fp32", progress=False)


def _hf_hidden(model, ids, hook_layer=None, add=None):
    """transformers' logits and output_hidden_states, with `add` added to block `hook_layer`'s output."""
    hooks = []
    if hook_layer is not None:
        def shift(mod, args, out):
            return (out[0] + torch.from_numpy(add),) + tuple(out[1:]) if isinstance(out, tuple) else out + \
                torch.from_numpy(add)
        hooks.append(model.model.layers[hook_layer].register_forward_hook(shift))
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(ids)[None], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("engine", ENGINES)
def test_hidden_states_are_transformers_residual_stream(fp32_family, engine):
    name, src, folder = fp32_family
    model = build_torch_model(src)
    _, hf = _hf_hidden(model, IDS)
    m = edgeact.load(folder, engine=engine)
    m.engine.reset()
    _, hidden = m.engine.forward(IDS, output_hidden=True)
    n = src.config.num_layers
    assert hidden.shape == (n, len(IDS), src.config.hidden_size)
    ours = torch_source(src).hidden(IDS.tolist())
    for i in range(n):
        # HF's entry i + 1 is block i's output; its last one has the final norm applied, which the
        # block-output hooks of torch_source stand in for
        want = hf[i + 1] if i < n - 1 else ours[i]
        tol = 1e-4 * max(1.0, np.abs(want).max())
        np.testing.assert_allclose(hidden[i], want, rtol=0, atol=tol, err_msg=f"{name} layer {i}")
        np.testing.assert_allclose(ours[i], want, rtol=0, atol=tol)


@pytest.mark.parametrize("engine", ENGINES)
def test_steering_add_matches_transformers(fp32_family, engine):
    name, src, folder = fp32_family
    model = build_torch_model(src)
    n, H = src.config.num_layers, src.config.hidden_size
    layer = n // 2
    base_logits, base_hidden = _hf_hidden(model, IDS)
    # a vector the size of the layer's states, so it changes the logits well beyond the tolerance
    v = np.random.default_rng(3).standard_normal(H).astype(np.float32)
    v *= np.float32(0.5 * np.linalg.norm(base_hidden[layer + 1], axis=-1).mean() / np.linalg.norm(v))
    want, _ = _hf_hidden(model, IDS, hook_layer=layer, add=v)
    assert np.abs(want - base_logits).max() > 0.05
    m = edgeact.load(folder, engine=engine)
    with m.steering(v, scale=1.0, layers=layer):
        got = m.forward(IDS)
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max()), name
    np.testing.assert_allclose(m.forward(IDS), base_logits, rtol=0, atol=1e-3 * max(1.0, np.abs(base_logits).max()))


def test_steering_vectors_from_the_engines_equal_transformers(fp32_family):
    name, src, folder = fp32_family
    rng = np.random.default_rng(9)
    vocab = src.config.vocab_size
    prompts = [[list(rng.integers(3, vocab, size=rng.integers(3, 8))) for _ in range(4)] for _ in range(2)]
    ref = compute_vectors(src, *prompts, method="mean-diff")
    for engine in ["ort"] + (["native"] if native_available() else []):
        ours = compute_vectors(edgeact.load(folder, engine=engine), *prompts, method="mean-diff")
        assert sorted(ours) == sorted(ref) == list(range(src.config.num_layers))
        for layer in ref:
            np.testing.assert_allclose(ours[layer], ref[layer], rtol=0, atol=1e-4 * max(1.0, np.abs(ref[layer]).max()),
                                       err_msg=f"{name} {engine} layer {layer}")


# ---------------------------------------------------------------- edgeact eval against a Hugging Face source

def _hf_folder(kind, path):
    import transformers

    small = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=256, num_hidden_layers=2, head_dim=32)
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**small, sliding_window=8, query_pre_attn_scalar=32,
                                            layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    else:
        cfg = transformers.Qwen3Config(**small, rope_theta=1e6)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(1)
    model = cls(cfg)
    with torch.no_grad():   # norms and biases off their 1 / 0 defaults
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in pname else 0.02))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
def test_eval_cli_on_a_family_checkpoint(kind, tmp_path, capsys, monkeypatch):
    """`edgeact eval` of fp32 and int4 folders against their Hugging Face source: fp32 has KL ~0 on
    both engines (measured ~1e-12; bound 1e-8) and top-1 1.0; int4 is further away. The text is sampled
    past Gemma's window of 8."""
    from edgeact.cli import main

    monkeypatch.setenv("EDGEACT_HOME", str(tmp_path / "home"))
    hf = _hf_folder(kind, tmp_path / "hf")
    fp32 = convert(hf, tmp_path / "fp32", quant="fp32", progress=False)
    int4 = convert(hf, tmp_path / "int4", quant="int4", progress=False)
    engines = ["ort"] + (["native"] if native_available() else [])
    for engine in engines:
        assert main(["eval", str(fp32), str(int4), "--ref", str(hf), "--tokens", "48", "--seed", "3",
                     "--engine", engine, "--json"]) == 0
        rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)["results"]}
        f, q = rows[str(fp32)], rows[str(int4)]
        assert f["n_tokens"] == q["n_tokens"] == 48
        assert f["kl"] <= 1e-8 and f["top1"] == 1.0 and abs(f["ppl_ratio"] - 1) <= 1e-4, (engine, f)
        assert f["kl"] < q["kl"] and q["bytes"] < f["bytes"], (engine, q)


def _word_tokenizer(folder, vocab_size=300):
    """A whitespace word-level tokenizer.json over the model's vocabulary (<bos> 2 added first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(4, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_steer_cli_on_gemma3_folder_equals_the_checkpoint(tmp_path, capsys):
    """`edgeact steer compute` on a converted Gemma 3 folder (each engine) writes the vectors that the
    same command computes from the Hugging Face checkpoint through transformers; `steer sweep` runs them."""
    from edgeact.cli import main
    from edgeact.control_vector import load_control_vector

    hf = _word_tokenizer(_hf_folder("gemma3", tmp_path / "hf"))
    folder = convert(hf, tmp_path / "fp32", quant="fp32", progress=False)
    rng = np.random.default_rng(4)
    for side in ("pos", "neg"):
        (tmp_path / f"{side}.txt").write_text("\n".join(" ".join(f"w{t}" for t in rng.integers(4, 300, 6))
                                                        for _ in range(4)) + "\n")
    sides = ["--pos", str(tmp_path / "pos.txt"), "--neg", str(tmp_path / "neg.txt")]
    assert main(["steer", "compute", str(hf), *sides, "-o", str(tmp_path / "ref.gguf")]) == 0
    ref = load_control_vector(tmp_path / "ref.gguf")
    assert sorted(ref) == [1]   # layers 1..last (llama.cpp holds no layer 0)
    for engine in ["ort"] + (["native"] if native_available() else []):
        out = tmp_path / f"{engine}.gguf"
        assert main(["steer", "compute", str(folder), *sides, "-o", str(out), "--engine", engine]) == 0
        got = load_control_vector(out)
        assert sorted(got) == sorted(ref)
        for layer in ref:
            np.testing.assert_allclose(got[layer], ref[layer], rtol=0, atol=1e-4 * np.abs(ref[layer]).max())
    capsys.readouterr()
    (tmp_path / "w+.txt").write_text("w10\nw11\n")
    (tmp_path / "w-.txt").write_text("w20\nw21\n")
    assert main(["steer", "sweep", str(folder), str(tmp_path / "ref.gguf"), "--prompts", str(tmp_path / "pos.txt"),
                 "--pos-words", str(tmp_path / "w+.txt"), "--neg-words", str(tmp_path / "w-.txt"),
                 "--scales=0,4", "--no-chat"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["0", "4"] and rows[0][1] != rows[1][1]
