"""Calibration data and activation capture, shared by AWQ and activation sparsity.

Activations are taken from the fp32 source model (not from a progressively
quantized one): every method then calibrates against the same, reproducible
inputs, and a layer's statistics do not depend on the choices made before it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .model import ConversionError, SourceModel
from .sampling import sample_batch

# Linears by the input they read (HF module names inside a decoder layer).
INPUT_GROUPS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "ffn_in": ("mlp.gate_proj", "mlp.up_proj"),
    "ffn_out": ("mlp.down_proj",),
}


def calibration_ids(src: SourceModel, model=None, *, text_file: str | Path | None = None, n_tokens: int = 1024,
                    seq_len: int = 256, seed: int = 1234, progress: bool = False) -> np.ndarray:
    """[n_seq, seq_len] int64 token ids: the text file tokenized with the source's tokenizer,
    or, by default, text the fp32 model samples itself (seeds seed, seed+1, ...)."""
    if n_tokens < 2:
        raise ConversionError(f"calibration needs at least 2 tokens, got {n_tokens}")
    if n_tokens < seq_len:
        seq_len = n_tokens
    n_seq = max(1, n_tokens // seq_len)
    if text_file is not None:
        if not src.tokenizer_json:
            raise ConversionError("--calib needs a tokenizer, and this source has none: omit --calib to calibrate "
                                  "on text the model samples itself")
        path = Path(text_file)
        if not path.is_file():
            raise ConversionError(f"calibration text {path} not found")
        from tokenizers import Tokenizer

        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConversionError(f"calibration text {path} is not UTF-8: byte 0x{data[e.start]:02x} "
                                  f"at offset {e.start}") from None
        ids = Tokenizer.from_str(src.tokenizer_json).encode(text).ids
        if len(ids) < seq_len:
            raise ConversionError(f"calibration text {path} has {len(ids)} tokens; need at least {seq_len}")
        n_seq = min(n_seq, len(ids) // seq_len)
        return np.asarray(ids[: n_seq * seq_len], dtype=np.int64).reshape(n_seq, seq_len)
    if model is None:
        from .torch_ref import build_torch_model

        model = build_torch_model(src, progress=progress)
    bos = src.config.bos_token_id
    return sample_batch(model, seq_len - 1, seeds=[seed + i for i in range(n_seq)], bos_id=bos,
                        progress=progress, desc="sampling calibration text")


class CaptureDone(Exception):
    """Raised by a hook after the last wanted layer to end a capture pass early."""


def stop_pass(module, args, output):
    """Forward hook that ends a capture pass after its module."""
    raise CaptureDone


# Phi-3 fuses q/k/v and gate/up into one linear each, which reads the same input.
FUSED_MODULES = {"self_attn.q_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj"}


def _input_module(block, name: str):
    try:
        return block.get_submodule(name)
    except AttributeError:
        if name not in FUSED_MODULES:
            raise
        return block.get_submodule(FUSED_MODULES[name])


@torch.no_grad()
def capture_inputs(model, ids: np.ndarray, layers: Iterable[int] | None = None,
                   groups: Iterable[str] = tuple(INPUT_GROUPS)) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of each linear group, as {(layer, group): [tokens, K] float32}, for the given layers
    (all by default). Memory: tokens × (sum of captured K) floats. Each pass stops after the
    last wanted layer: the layers above it cannot change what was captured."""
    layer_set = set(range(len(model.model.layers)) if layers is None else layers)
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    if layer_set:
        hooks.append(model.model.layers[max(layer_set)].register_forward_hook(stop_pass))
    for i, block in enumerate(model.model.layers):
        if i not in layer_set:
            continue
        for g in groups:
            mod = _input_module(block, INPUT_GROUPS[g][0])

            def hook(m, args, i=i, g=g):
                out.setdefault((i, g), []).append(args[0].reshape(-1, args[0].shape[-1]).detach().float().clone())

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for row in np.atleast_2d(ids):
            try:
                model(torch.from_numpy(np.asarray(row, dtype=np.int64))[None])
            except CaptureDone:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}

