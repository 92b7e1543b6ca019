"""llama.cpp control vectors: the GGUF file format steering vectors travel in.

A control vector file is a GGUF with `general.architecture = "controlvector"`,
`controlvector.model_hint` (the model's architecture, e.g. "llama"),
`controlvector.layer_count` and one 1-D F32 tensor `direction.<N>` of n_embd
per steered layer.

Layer numbering (read from llama.cpp's source, `common_control_vector_load_one`
in common/common.cpp, `llama_adapter_cvec::apply`/`tensor_for` in
src/llama-adapter.cpp and `build_cvec(cur, il)` at the end of the block loop in
src/models/llama.cpp):
  * the loader stores `direction.N` at buffer row N-1 and rejects N = 0;
  * `apply` copies buffer row il-1 into the tensor of block il (il = 1..n_layer-1);
  * the graph adds the tensor of block il to that block's output (`l_out`, after
    the FFN residual add), blocks counted from 0.
So `direction.N` is added to the output of block N (0-based), which is exactly
our steering point `steer.N` / `hidden.N`: the mapping is the identity, and
layer 0 cannot be expressed in a llama.cpp file. (llama.cpp's own
cvector-generator fills `direction.N` from the activations of block N-1; that
one-layer shift is in its generator, not in the format.) Several tensors for
the same layer are summed, as llama.cpp does.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ARCH = "controlvector"
_PREFIX = "direction."


def save_control_vector(path, directions: dict[int, np.ndarray], model_hint: str = "llama") -> Path:
    """Write `directions` ({our 0-based layer: [n_embd] vector}) as a llama.cpp control vector."""
    import gguf

    vectors = _checked_directions(directions)
    if 0 in vectors:
        raise ValueError("layer 0 cannot be stored in a llama.cpp control vector "
                         "(llama.cpp has no steering point after block 0); steer from layer 1 up")
    if not isinstance(model_hint, str) or not model_hint:
        raise ValueError("model_hint must be a non-empty string such as 'llama'")
    path = Path(path)
    # Written beside the target and renamed so a failed write never leaves half a file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch=ARCH)
    try:
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", len(vectors))
        for layer in sorted(vectors):
            writer.add_tensor(f"{_PREFIX}{layer}", vectors[layer])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def load_control_vector(path, hidden_size: int | None = None,
                        num_layers: int | None = None) -> dict[int, np.ndarray]:
    """Read a llama.cpp control vector: {our 0-based layer: float32 [n_embd]}.

    With `hidden_size`/`num_layers` given, a vector of another model's width or a
    layer the model does not have is an error (llama.cpp drops such layers silently).
    """
    reader, path = _open(path)
    arch = _string_field(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        raise ValueError(f"{path}: general.architecture is {arch!r}, not a control vector ({ARCH!r})")
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        layer = _layer_of(t.name, path)
        if int(t.tensor_type) != 0:  # GGML_TYPE_F32
            raise ValueError(f"{path}: tensor {t.name} is not F32 (type {t.tensor_type.name})")
        if len(t.shape) != 1:
            raise ValueError(f"{path}: tensor {t.name} is not 1-D (shape {list(t.shape)})")
        vec = np.array(t.data, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"{path}: tensor {t.name} contains NaN or Inf")
        if out and vec.shape[0] != next(iter(out.values())).shape[0]:
            raise ValueError(f"{path}: tensor {t.name} has {vec.shape[0]} elements, "
                             f"the others {next(iter(out.values())).shape[0]}")
        out[layer] = vec
    if not out:
        raise ValueError(f"{path}: no direction.N tensors in this control vector")
    width = next(iter(out.values())).shape[0]
    if hidden_size is not None and width != hidden_size:
        raise ValueError(f"{path}: control vector has n_embd {width}, the model's hidden size is {hidden_size}")
    if num_layers is not None and max(out) >= num_layers:
        raise ValueError(f"{path}: control vector steers layer {max(out)}, "
                         f"the model has layers 0..{num_layers - 1}")
    return dict(sorted(out.items()))


def control_vector_info(path) -> dict:
    """Metadata and per-layer norms of a control vector file (for `edgeact steer info`)."""
    reader, path = _open(path)
    directions = load_control_vector(path)
    count = _int_field(reader, f"{ARCH}.layer_count")
    return {
        "path": str(path),
        "architecture": _string_field(reader, "general.architecture"),
        "model_hint": _string_field(reader, f"{ARCH}.model_hint"),
        "layer_count": count,
        "n_embd": next(iter(directions.values())).shape[0],
        "layers": list(directions),
        "norms": {layer: float(np.linalg.norm(v)) for layer, v in directions.items()},
    }


def _checked_directions(directions) -> dict[int, np.ndarray]:
    if not isinstance(directions, dict) or not directions:
        raise ValueError("directions must be a non-empty dict {layer: vector}")
    out, width = {}, None
    for layer, vec in directions.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"layer keys must be non-negative integers, got {layer!r}")
        v = np.asarray(vec, dtype=np.float32)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"direction for layer {layer} must be a 1-D vector, got shape {v.shape}")
        if width is not None and v.shape[0] != width:
            raise ValueError(f"direction for layer {layer} has {v.shape[0]} elements, the others {width}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"direction for layer {layer} contains NaN or Inf")
        width = v.shape[0]
        out[int(layer)] = np.ascontiguousarray(v)
    return out


def _open(path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"control vector file not found: {path}")
    try:
        return gguf.GGUFReader(str(path)), path
    except Exception as e:  # the gguf package raises ValueError, struct/IndexError... on bad files
        raise ValueError(f"{path}: not a readable GGUF control vector ({type(e).__name__}: {e})") from None


def _layer_of(name: str, path) -> int:
    if not name.startswith(_PREFIX) or not name[len(_PREFIX):].isdigit():
        raise ValueError(f"{path}: unexpected tensor {name!r} (a control vector holds only direction.N tensors)")
    n = int(name[len(_PREFIX):])
    if n == 0:
        raise ValueError(f"{path}: tensor direction.0 is invalid (llama.cpp numbers directions from 1)")
    return n


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _int_field(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return int(field.parts[field.data[0]][0])
