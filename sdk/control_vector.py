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
one-layer shift is in its generator, not in the format.) Vectors from several
files for the same layer are summed, as llama.cpp does; one file holding a
layer twice is an error.

The file is read and written here, not with the `gguf` package: running a folder with a
steering vector is the device's job, and the device install leaves the converter packages
out. The subset is small (a few scalar/string keys, 1-D F32 tensors), and the reader checks
every count, length and offset against the file, so a damaged or hostile file is a clear
ValueError, never an exception from deep in a parser or a huge allocation.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

ARCH = "controlvector"
_PREFIX = "direction."
_MAGIC = b"GGUF"
_ALIGN = 32              # GGUF's default general.alignment
_MAX_FILE = 1 << 30      # a control vector is n_embd x layers floats: 512 KB for a 7B model
_MAX_DIMS = 4            # GGML_MAX_DIMS

# GGUF metadata value types: struct code of the scalars; 8 string, 9 array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_GGML_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
                    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 24: "I8",
                    25: "I16", 26: "I32", 27: "I64", 28: "F64", 30: "BF16"}


def save_control_vector(path, directions: dict[int, np.ndarray], model_hint: str = "llama") -> Path:
    """Write `directions` ({our 0-based layer: [n_embd] vector}) as a llama.cpp control vector."""
    vectors = _checked_directions(directions)
    if 0 in vectors:
        raise ValueError("layer 0 cannot be stored in a llama.cpp control vector "
                         "(llama.cpp has no steering point after block 0); steer from layer 1 up")
    if not isinstance(model_hint, str) or not model_hint:
        raise ValueError("model_hint must be a non-empty string such as 'llama'")
    data = _encode({"general.architecture": ARCH, f"{ARCH}.model_hint": model_hint,
                    f"{ARCH}.layer_count": np.int32(len(vectors))},
                   {f"{_PREFIX}{layer}": vectors[layer] for layer in sorted(vectors)})
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
    # Written beside the target and renamed so a failed write never leaves half a file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_control_vector(path, hidden_size: int | None = None,
                        num_layers: int | None = None) -> dict[int, np.ndarray]:
    """Read a llama.cpp control vector: {our 0-based layer: float32 [n_embd]}.

    With `hidden_size`/`num_layers` given, a vector of another model's width or a
    layer the model does not have is an error (llama.cpp drops such layers silently).
    """
    return _directions(read_gguf(path), hidden_size, num_layers)


def control_vector_info(path) -> dict:
    """Metadata and per-layer norms of a control vector file (for `edgeact steer info`)."""
    g = read_gguf(path)
    directions = _directions(g)
    count = g.fields.get(f"{ARCH}.layer_count")
    return {
        "path": str(g.path),
        "architecture": _str_or_none(g.fields.get("general.architecture")),
        "model_hint": _str_or_none(g.fields.get(f"{ARCH}.model_hint")),
        "layer_count": int(count) if isinstance(count, (int, np.integer)) else None,
        "n_embd": next(iter(directions.values())).shape[0],
        "layers": list(directions),
        "norms": {layer: float(np.linalg.norm(v)) for layer, v in directions.items()},
    }


def _directions(g: "GGUFFile", hidden_size=None, num_layers=None) -> dict[int, np.ndarray]:
    path = g.path
    arch = g.fields.get("general.architecture")
    if arch is not None and arch != ARCH:
        raise ValueError(f"{path}: general.architecture is {arch!r}, not a control vector ({ARCH!r})")
    out: dict[int, np.ndarray] = {}
    for t in g.tensors:
        layer = _layer_of(t.name, path)
        if t.ggml_type != 0:
            raise ValueError(f"{path}: tensor {t.name} is not F32 (type {_GGML_TYPE_NAMES.get(t.ggml_type, t.ggml_type)})")
        if len(t.shape) != 1:
            raise ValueError(f"{path}: tensor {t.name} is not 1-D (shape {list(t.shape)})")
        vec = t.data
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"{path}: tensor {t.name} contains NaN or Inf")
        if out and vec.shape[0] != next(iter(out.values())).shape[0]:
            raise ValueError(f"{path}: tensor {t.name} has {vec.shape[0]} elements, "
                             f"the others {next(iter(out.values())).shape[0]}")
        if layer in out:
            raise ValueError(f"{path}: tensor {t.name} appears twice")
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


# ---- GGUF, the subset control vectors use -------------------------------------------------------

class GGUFTensor:
    def __init__(self, name: str, shape: tuple, ggml_type: int, offset: int):
        self.name, self.shape, self.ggml_type, self.offset = name, shape, ggml_type, offset
        self.data: np.ndarray | None = None   # float32, for F32 tensors


class GGUFFile:
    def __init__(self, path: Path, version: int, fields: dict, tensors: list):
        self.path, self.version, self.fields, self.tensors = path, version, fields, tensors


class _Cursor:
    def __init__(self, buf: bytes, path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise ValueError(f"{self.path}: not a readable GGUF control vector: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.buf) - self.pos:
            self.fail(f"{what} runs past the end of the file ({n} bytes wanted, {len(self.buf) - self.pos} left)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, code: str, what: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("Q", what + " length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR:
            v = self.scalar(_SCALAR[vtype], what)
            return np.int32(v) if vtype == 5 else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            etype, count = self.scalar("I", what + " element type"), self.scalar("Q", what + " count")
            if etype in _SCALAR:
                size = struct.calcsize(_SCALAR[etype])
                raw = self.take(count * size if count <= len(self.buf) else len(self.buf) + 1, what)
                return list(struct.unpack(f"<{count}{_SCALAR[etype]}", raw))
            if count > len(self.buf) - self.pos:   # every element takes at least one byte
                self.fail(f"{what} claims {count} elements")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        self.fail(f"{what} has unknown value type {vtype}")


def read_gguf(path) -> GGUFFile:
    """Header, metadata and tensor list of a GGUF file, every F32 tensor's data as float32 (checked)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"control vector file not found: {path}")
    size = path.stat().st_size
    if size > _MAX_FILE:
        raise ValueError(f"{path}: {size} bytes is too large for a control vector")
    c = _Cursor(path.read_bytes(), path)
    if c.buf[:4] != _MAGIC:
        raise ValueError(f"{path}: not a readable GGUF control vector (it does not start with 'GGUF')")
    c.pos = 4
    version = c.scalar("I", "version")
    if version not in (2, 3):
        c.fail(f"GGUF version {version} (versions 2 and 3 are read)")
    n_tensors, n_kv = c.scalar("Q", "tensor count"), c.scalar("Q", "key count")
    if n_tensors > size or n_kv > size:
        c.fail(f"{n_tensors} tensors and {n_kv} keys do not fit in {size} bytes")
    fields: dict = {}
    for _ in range(n_kv):
        key = c.string("key")
        fields[key] = c.value(c.scalar("I", f"type of {key}"), key)
    align = fields.get("general.alignment", _ALIGN)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
        c.fail(f"general.alignment {align!r} is not a power of two")
    tensors = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        n_dims = c.scalar("I", f"dims of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            c.fail(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(c.scalar("Q", f"shape of {name}") for _ in range(n_dims))
        tensors.append(GGUFTensor(name, shape, c.scalar("I", f"type of {name}"), c.scalar("Q", f"offset of {name}")))
    start = -(-c.pos // align) * align
    for t in tensors:
        if t.ggml_type != 0:
            continue
        n = 1
        for d in t.shape:
            n *= d
        end = start + t.offset + 4 * n
        if t.offset % align or end > size:
            raise ValueError(f"{path}: tensor {t.name} ({list(t.shape)} floats at offset {t.offset}) "
                             f"does not lie within the file's data")
        t.data = np.frombuffer(c.buf, dtype="<f4", count=n, offset=start + t.offset).astype(np.float32)
    return GGUFFile(path, version, fields, tensors)


def _encode(fields: dict, tensors: dict[str, np.ndarray]) -> bytes:
    """A GGUF v3 file: string and int32 keys, 1-D F32 tensors (what llama.cpp reads as a control vector)."""
    def s(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    out = bytearray(_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(fields)))
    for key, v in fields.items():
        out += s(key) + (struct.pack("<I", _STRING) + s(v) if isinstance(v, str) else struct.pack("<Ii", 5, int(v)))
    offset, blobs = 0, []
    for name, vec in tensors.items():
        out += s(name) + struct.pack("<IQIQ", 1, vec.shape[0], 0, offset)
        blob = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        blob += b"\0" * (-len(blob) % _ALIGN)
        blobs.append(blob)
        offset += len(blob)
    out += b"\0" * (-len(out) % _ALIGN)
    return bytes(out) + b"".join(blobs)


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


def _layer_of(name: str, path) -> int:
    if not name.startswith(_PREFIX) or not name[len(_PREFIX):].isdigit():
        raise ValueError(f"{path}: unexpected tensor {name!r} (a control vector holds only direction.N tensors)")
    n = int(name[len(_PREFIX):])
    if n == 0:
        raise ValueError(f"{path}: tensor direction.0 is invalid (llama.cpp numbers directions from 1)")
    return n


def _str_or_none(v):
    return v if isinstance(v, str) else None
