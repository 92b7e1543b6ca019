"""NativeModel / NativeSession: numpy over the C API in native/include/edgeact.h.

Arrays cross the boundary through ffi.from_buffer (no copies when the caller's
array is already C-contiguous with the right dtype).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..contract import META_FILE, MODEL_FILE, check_meta
from ._native import ffi, lib

# Error codes of edgeact.h
_ERR_IO, _ERR_FORMAT, _ERR_ARG, _ERR_CONTEXT, _ERR_NOMEM, _ERR_KERNEL, _ERR_STATE = -1, -2, -3, -4, -5, -6, -7


class NativeError(RuntimeError):
    """A failure inside the native runtime (kernel, memory, state)."""


class ModelFormatError(ValueError):
    """model.onnx is malformed or uses something the native runtime does not execute."""


class ContextOverflowError(ValueError):
    """The tokens do not fit in the session's n_ctx."""


def _check(rc: int) -> None:
    if rc == 0:
        return
    msg = ffi.string(lib.ea_last_error()).decode("utf-8", "replace")
    if rc == _ERR_IO:
        raise FileNotFoundError(msg)
    if rc == _ERR_FORMAT:
        raise ModelFormatError(msg)
    if rc == _ERR_ARG:
        raise ValueError(msg)
    if rc == _ERR_CONTEXT:
        raise ContextOverflowError(msg)
    if rc == _ERR_NOMEM:
        raise MemoryError(msg)
    raise NativeError(msg)


def _f32(a, shape_tail: int | None = None) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if shape_tail is not None and (a.ndim == 0 or a.shape[-1] != shape_tail):
        raise ValueError(f"expected a last dimension of {shape_tail}, got shape {a.shape}")
    return a


def physical_cores() -> int:
    """Physical cores as the C runtime counts them (its default thread count): distinct (package,
    core) pairs, SMT siblings counted once."""
    return int(lib.ea_physical_cores())


def default_isa() -> str:
    """The kernel variant a model loaded now would run (e.g. "avx512-vnni"): the CPU's best,
    or EDGEACT_ISA's; "unavailable" when EDGEACT_ISA names one this CPU lacks."""
    p = lib.ea_default_isa()
    return ffi.string(p).decode() if p != ffi.NULL else "unavailable"


def version() -> str:
    """ea_version() of the loaded C library (equal to edgeact.contract.VERSION: tests/test_layers.py)."""
    return ffi.string(lib.ea_version()).decode()


class NativeModel:
    """A model folder loaded by the C runtime (immutable; sessions share it)."""

    def __init__(self, folder: str | os.PathLike, low_memory: bool = False):
        """low_memory: matmuls behind a Sparsify keep only the channel-major copy their sparse
        decode reads (no dense repack): about the memory of a dense folder; prefill always runs the
        input-sparse GEMV row by row (docs/sparsity.md, "Low memory")."""
        self.folder = Path(folder)
        if not (self.folder / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{self.folder} has no {MODEL_FILE}")
        if (self.folder / META_FILE).is_file():   # a bare model.onnx loads too (tests, tools)
            import json

            try:
                check_meta(json.loads((self.folder / META_FILE).read_text()), str(self.folder / META_FILE))
            except json.JSONDecodeError as e:
                raise ModelFormatError(f"{self.folder / META_FILE} is not valid JSON: {e}") from None
            except ValueError as e:
                raise ModelFormatError(str(e)) from None
        out = ffi.new("ea_model **")
        flags = lib.EA_LOAD_SPARSE_LOWMEM if low_memory else 0
        _check(lib.ea_model_load_opts(os.fsencode(self.folder), flags, out))
        self._ptr = ffi.gc(out[0], lib.ea_model_free)
        self._read_info()

    @classmethod
    def from_bytes(cls, data: bytes, folder: str | os.PathLike | None = None) -> "NativeModel":
        """Load from an in-memory model.onnx (external data, if any, resolved in `folder`)."""
        self = cls.__new__(cls)
        self.folder = Path(folder) if folder else None
        out = ffi.new("ea_model **")
        _check(lib.ea_model_load_buffer(data, len(data), os.fsencode(folder) if folder else ffi.NULL, out))
        self._ptr = ffi.gc(out[0], lib.ea_model_free)
        self._read_info()
        return self

    def _read_info(self) -> None:
        info = ffi.new("ea_model_info *")
        _check(lib.ea_model_get_info(self._ptr, info))
        self.n_layers, self.hidden, self.vocab = info.n_layers, info.hidden, info.vocab
        self.max_context = info.max_context
        self.n_heads, self.n_kv_heads, self.head_dim = info.n_heads, info.n_kv_heads, info.head_dim
        self.n_nodes, self.n_steer_layers = info.n_nodes, info.n_steer_layers
        self.n_mask_layers, self.mask_width = info.n_mask_layers, info.mask_width
        self.isa = ffi.string(info.isa).decode()
        self.weight_bytes = {"mapped": int(info.weight_bytes_mapped), "copied": int(info.weight_bytes_copied),
                             "repacked": int(info.weight_bytes_repacked)}

    def info(self) -> dict:
        """What the runtime made of the folder (for `edgeact info` and benchmarks)."""
        return {"isa": self.isa, "layers": self.n_layers, "hidden": self.hidden, "vocab": self.vocab,
                "max_context": self.max_context, "heads": self.n_heads, "kv_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "nodes": self.n_nodes, "steer_layers": self.n_steer_layers,
                **{f"weights_{k}_bytes": v for k, v in self.weight_bytes.items()},
                "ops": self.op_counts()}

    def op_counts(self) -> dict[str, int]:
        name, count = ffi.new("const char **"), ffi.new("int *")
        out = {}
        for i in range(lib.ea_model_n_op_types(self._ptr)):
            _check(lib.ea_model_op_type(self._ptr, i, name, count))
            out[ffi.string(name[0]).decode()] = count[0]
        return out

    def session(self, threads: int = 0, n_ctx: int = 0, max_chunk: int = 0) -> "NativeSession":
        return NativeSession(self, threads=threads, n_ctx=n_ctx, max_chunk=max_chunk)


class NativeSession:
    """One decoding stream: KV cache, steering, capture and profiler state."""

    def __init__(self, model: NativeModel, threads: int = 0, n_ctx: int = 0, max_chunk: int = 0):
        """threads 0: one per physical core; n_ctx 0: min(the model's max_context, 4096), the C
        runtime's default, since the KV cache for the whole context is allocated here."""
        for name, v in (("threads", threads), ("n_ctx", n_ctx), ("max_chunk", max_chunk)):
            if int(v) < 0:  # the C API reads <= 0 as "default": a negative value is a mistake, not that
                raise ValueError(f"{name} must be >= 0 (0: the default), not {v}")
        self.model = model   # keeps the model alive while the session exists
        out = ffi.new("ea_session **")
        _check(lib.ea_session_create(model._ptr, int(threads), int(n_ctx), int(max_chunk), out))
        self._ptr = ffi.gc(out[0], lib.ea_session_free)
        self.n_ctx = lib.ea_session_n_ctx(self._ptr)
        self.threads = lib.ea_session_n_threads(self._ptr)

    @property
    def n_past(self) -> int:
        return lib.ea_session_n_past(self._ptr)

    def reset(self) -> None:
        _check(lib.ea_session_reset(self._ptr))

    def truncate(self, n_past: int) -> None:
        """Keep the first n_past cached tokens (at most the current n_past)."""
        _check(lib.ea_session_truncate(self._ptr, int(n_past)))

    @property
    def memory_bytes(self) -> int:
        """KV cache (sized for n_ctx) and activation buffers this session owns; weights are the model's."""
        return int(lib.ea_session_memory_bytes(self._ptr))

    def forward(self, ids, all_logits: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """Append tokens; return logits [n, vocab] (all_logits) or [vocab] for the last token."""
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        n = ids.shape[0]
        shape = (n, self.model.vocab) if all_logits else (self.model.vocab,)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        _check(lib.ea_session_forward(self._ptr, ffi.from_buffer("int64_t[]", ids), n,
                                      ffi.from_buffer("float[]", out), int(bool(all_logits))))
        return out

    # --- steering ---------------------------------------------------------------------------
    def set_steering(self, layer: int, add=None, ablate=None) -> None:
        """After layer `layer`: h <- h - (h A^T) A + add; add [hidden], ablate [R, hidden] (or [hidden])."""
        add_p = ablate_p = ffi.NULL
        R = 0
        if add is not None:
            add = _f32(add, self.model.hidden).reshape(-1)
            if add.shape[0] != self.model.hidden:
                raise ValueError(f"steering add must have {self.model.hidden} values, got {add.shape}")
            add_p = ffi.from_buffer("float[]", add)
        if ablate is not None:
            ablate = _f32(ablate, self.model.hidden).reshape(-1, self.model.hidden)
            R = ablate.shape[0]
            ablate_p = ffi.from_buffer("float[]", ablate)
        _check(lib.ea_session_set_steering(self._ptr, int(layer), add_p, ablate_p, R))

    def clear_steering(self, layer: int | None = None) -> None:
        _check(lib.ea_session_clear_steering(self._ptr, -1 if layer is None else int(layer)))

    # --- CoreInfer neuron masks -------------------------------------------------------------
    def set_neuron_mask(self, layer: int, mask=None) -> None:
        """FFN neurons of layer `layer` to compute (mask != 0); None restores the model's default (all)."""
        if mask is None:
            _check(lib.ea_session_set_neuron_mask(self._ptr, int(layer), ffi.NULL, 0))
            return
        mask = np.ascontiguousarray(np.asarray(mask, dtype=np.float32).reshape(-1))
        _check(lib.ea_session_set_neuron_mask(self._ptr, int(layer), ffi.from_buffer("float[]", mask), mask.size))

    def neuron_scores(self) -> np.ndarray:
        """ffn_score.{i} of the last forward: [mask layers, FFN width] counts of token-wise top-k hits."""
        out = np.empty((self.model.n_mask_layers, self.model.mask_width), np.float32)
        for i in range(self.model.n_mask_layers):
            _check(lib.ea_session_get_neuron_scores(self._ptr, i, ffi.from_buffer("float[]", out[i]), out.shape[1]))
        return out

    # --- hidden-state capture ---------------------------------------------------------------
    def capture_hidden(self, on: bool = True) -> None:
        _check(lib.ea_session_capture_hidden(self._ptr, int(bool(on))))

    def hidden_states(self) -> np.ndarray:
        """hidden.{i} of every token of the last forward: [n_layers, tokens, hidden]."""
        t = lib.ea_session_hidden_tokens(self._ptr)
        out = np.empty((self.model.n_steer_layers or self.model.n_layers, t, self.model.hidden), np.float32)
        _check(lib.ea_session_get_hidden(self._ptr, ffi.from_buffer("float[]", out), out.size))
        return out

    # --- profiler ---------------------------------------------------------------------------
    def profile(self, on: bool = True) -> None:
        _check(lib.ea_session_profile(self._ptr, int(bool(on))))

    def profile_reset(self) -> None:
        _check(lib.ea_session_profile_reset(self._ptr))

    def profile_records(self) -> list[dict]:
        rec = ffi.new("ea_profile_record *")
        out = []
        for i in range(lib.ea_session_profile_count(self._ptr)):
            _check(lib.ea_session_profile_get(self._ptr, i, rec))
            out.append({"name": ffi.string(rec.name).decode(), "op_type": ffi.string(rec.op_type).decode(),
                        "calls": int(rec.calls), "ns": int(rec.ns), "weight_bytes": int(rec.weight_bytes),
                        "active": int(rec.active), "total": int(rec.total),
                        "sparse_calls": int(rec.sparse_calls), "sparse_eligible": int(rec.sparse_eligible)})
        return out


def profile_by_op(records: list[dict]) -> dict[str, dict]:
    """Per-op-type totals of profile_records()."""
    agg: dict[str, dict] = {}
    for r in records:
        a = agg.setdefault(r["op_type"], {"nodes": 0, "calls": 0, "ns": 0, "weight_bytes": 0})
        a["nodes"] += 1
        for k in ("calls", "ns", "weight_bytes"):
            a[k] += r[k]
    return agg


def format_profile(records: list[dict], isa: str | None = None) -> str:
    """The per-op-type table the CLI prints (after a line naming the kernel variant, when given)."""
    agg = profile_by_op(records)
    total = sum(a["ns"] for a in agg.values()) or 1
    lines = [f"kernels: {isa}"] if isa else []
    lines.append(f"{'op':<22}{'nodes':>7}{'calls':>9}{'ms':>11}{'%':>7}{'GB/s':>8}")
    for op, a in sorted(agg.items(), key=lambda kv: -kv[1]["ns"]):
        gbs = a["weight_bytes"] / a["ns"] if a["ns"] else 0.0
        lines.append(f"{op:<22}{a['nodes']:>7}{a['calls']:>9}{a['ns'] / 1e6:>11.3f}{100 * a['ns'] / total:>7.1f}{gbs:>8.2f}")
    return "\n".join(lines)


class QMatMul:
    """Our int4/int8 MatMulNBits kernel on given arrays, for benchmarks: y = x @ W^T."""

    def __init__(self, K: int, N: int, bits: int, block_size: int, B, scales, zero_points=None, threads: int = 0):
        self.K, self.N = int(K), int(N)
        B = np.ascontiguousarray(B, dtype=np.uint8)
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        nb = -(-self.K // block_size)
        if B.size != self.N * nb * block_size * bits // 8 or scales.size != self.N * nb:
            raise ValueError(f"B ({B.size} bytes) / scales ({scales.size}) do not match K={K}, N={N}, "
                             f"bits={bits}, block_size={block_size}")
        zp = ffi.NULL
        if zero_points is not None:
            zero_points = np.ascontiguousarray(zero_points, dtype=np.uint8)
            want = self.N * ((nb + 1) // 2) if bits == 4 else self.N * nb
            if zero_points.size != want:
                raise ValueError(f"zero_points has {zero_points.size} bytes, expected {want}")
            zp = ffi.from_buffer("uint8_t[]", zero_points)
        out = ffi.new("ea_bench_qmatmul **")
        _check(lib.ea_bench_qmatmul_create(self.K, self.N, int(bits), int(block_size), ffi.from_buffer("uint8_t[]", B),
                                           ffi.from_buffer("float[]", scales), zp, int(threads), out))
        self._ptr = ffi.gc(out[0], lib.ea_bench_qmatmul_free)
        self.bytes = int(lib.ea_bench_qmatmul_bytes(self._ptr))  # what one call reads

    def __call__(self, x, out: np.ndarray | None = None) -> np.ndarray:
        x = _f32(x, self.K).reshape(-1, self.K)
        if out is None:
            out = np.empty((x.shape[0], self.N), np.float32)
        _check(lib.ea_bench_qmatmul_run(self._ptr, ffi.from_buffer("float[]", x), x.shape[0],
                                        ffi.from_buffer("float[]", out)))
        return out


def _check_probe_args(threads: int, nbytes: int, reps: int) -> None:
    if threads < 0 or threads > 256 or nbytes < (1 << 20) or reps < 1:
        raise ValueError(f"need 0 <= threads <= 256, nbytes >= 1 MiB, reps >= 1 (got {threads}, {nbytes}, {reps})")


def _probe_result(gbs: float, nbytes: int) -> float:
    if gbs == -2.0:
        raise MemoryError(f"no memory for a {nbytes}-byte probe buffer")
    if gbs < 0:
        raise ValueError("the native probe rejected its arguments")
    return gbs


def measure_read_bandwidth(threads: int = 0, nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Machine memory read bandwidth in GB/s (native probe; threads 0: one per physical core)."""
    _check_probe_args(threads, nbytes, reps)
    return _probe_result(float(lib.ea_measure_read_bandwidth(int(threads), int(nbytes), int(reps))), nbytes)


def measure_rows_read_bandwidth(threads: int = 0, nbytes: int = 1 << 30, row_bytes: int = 1024,
                                active: float = 0.5, reps: int = 3) -> float:
    """GB/s over a random `active` share of `row_bytes`-byte rows of an `nbytes` buffer, each row
    read whole in ascending order (native probe; threads 0: one per physical core): what the
    input-sparse GEMV asks of memory. Beside measure_read_bandwidth it shows how much of the
    skipped bytes' time input sparsity can save on this machine (for rows this short)."""
    _check_probe_args(threads, nbytes, reps)
    if row_bytes < 64 or row_bytes % 64 or row_bytes > nbytes // 16:
        raise ValueError(f"row_bytes must be a multiple of 64 in [64, nbytes/16], not {row_bytes}")
    if not 0.0 < active <= 1.0:
        raise ValueError(f"active must be in (0, 1], not {active}")
    return _probe_result(float(lib.ea_measure_rows_read_bandwidth(int(threads), int(nbytes), int(row_bytes),
                                                                  float(active), int(reps))), nbytes)
