"""The model-folder contract: what a converter writes and every engine reads (docs/model-folder.md).

This module is the one place the three layers agree on — converters write to it, the
runtime and the SDK read by it — so it imports nothing but the standard library, and
nothing of converters, runtime or SDK. It lives in its own source folder (contract/,
installed as `edgeact.contract`) because a module under sdk/ would make every
converter import an SDK import; tests/test_layers.py checks that the "never" rules hold.

The native C runtime cannot import Python: its side of the contract (op names, tensor
names, block sizes, ea_version()) is checked against this module by tests/test_layers.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# One version for the Python package, the converter stamp in edgeact.json and the C
# library's ea_version() (pyproject.toml reads it from here; native/src/api.c is pinned by a test).
VERSION = "0.2.0"

FORMAT = "edgeact-model"
FORMAT_VERSION = 1              # bumped when a folder written now would mislead an older reader
META_FILE, MODEL_FILE, TOKENIZER_FILE = "edgeact.json", "model.onnx", "tokenizer.json"

# ---- the graph: op names by domain (what a folder may contain and the native runtime executes)
OPSET = {"": 23, "com.microsoft": 1, "ai.edgeact": 1}
EDGEACT_DOMAIN = "ai.edgeact"
OPS = frozenset({("", "Gather"), ("", "Cast"), ("", "RMSNormalization"), ("", "MatMul"), ("", "Add"),
                 ("", "Mul"), ("", "Sigmoid"), ("com.microsoft", "MatMulNBits"),
                 ("com.microsoft", "GroupQueryAttention"), (EDGEACT_DOMAIN, "Steer"),
                 (EDGEACT_DOMAIN, "Sparsify"), (EDGEACT_DOMAIN, "NeuronMask"),
                 # a tied model's one table (the lookup in lm_head's blocks), float zero points from fp16 minimums
                 ("com.microsoft", "GatherBlockQuantized"), ("", "Reshape"), ("", "Slice"), ("", "Div")})

# ---- tensor names at the graph's boundary
INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, LOGITS = "input_ids", "seqlens_k", "total_sequence_length", "logits"


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def steer_add(i: int) -> str:
    """Initializer [hidden] that doubles as an input: added after layer i (a baked default when non-zero)."""
    return f"steer.{i}.add"


def steer_ablate(i: int) -> str:
    return f"steer.{i}.ablate"


def hidden(i: int) -> str:
    return f"hidden.{i}"


def ffn_mask(i: int) -> str:
    return f"ffn_mask.{i}"


# ---- what each engine runs: quantization block sizes (MatMulNBits block_size) and weight bits
ENGINES = ("native", "ort")
BLOCK_SIZES = {"native": (32, 64, 128), "ort": (16, 32, 64, 128)}
WEIGHT_BITS = {"native": (4, 8), "ort": (4, 8)}


def block_sizes(engines=ENGINES) -> tuple[int, ...]:
    """Block sizes every engine in `engines` runs: what a converter may write for those engines."""
    sets = [set(BLOCK_SIZES[e]) for e in engines]
    return tuple(sorted(set.intersection(*sets)))


def check_block_size(block_size: int, engines=ENGINES) -> str | None:
    """None when every engine in `engines` runs `block_size`, else a one-line reason."""
    if block_size in block_sizes(engines):
        return None
    refuse = [e for e in engines if block_size not in BLOCK_SIZES[e]]
    return (f"group size {block_size} is not supported by the {' or '.join(refuse)} engine; "
            f"choose one of {', '.join(map(str, block_sizes(engines)))}")


# ---- edgeact.json

HIDDEN_ACTS = ("silu", "gelu_tanh")


@dataclass
class ModelConfig:
    """edgeact.json's "config" (the model's shape; what every engine sizes itself from)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # as in HF config.json (e.g. llama3, linear)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # qwen2 has q/k/v biases
    arch: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Family details (defaults: the Llama block); docs/model-folder.md shows each in the graph
    hidden_act: str = "silu"                    # FFN gate activation: silu | gelu_tanh (Gemma)
    norm_offset: float = 0.0                    # RMSNorm scales by (norm_offset + w): 1 for Gemma
    embedding_multiplier: float = 1.0           # embedding rows scaled by this (Gemma: sqrt(hidden))
    sandwich_norms: bool = False                # norms after attention and after the FFN too (Gemma)
    qk_norm: bool = False                       # per-head RMSNorm of q and k before rotary (Gemma 3, Qwen3)
    attention_scale: float | None = None        # softmax scale; None = 1/sqrt(head_dim)
    sliding_window: int | None = None           # tokens a sliding layer sees, itself included
    layer_types: list[str] | None = None        # per layer: "full_attention" | "sliding_attention"
    rope_local_theta: float | None = None       # rope base of sliding layers (Gemma 3), unscaled
    partial_rotary_factor: float = 1.0          # fraction of head_dim that rotates (Phi)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window and self.layer_types and self.layer_types[layer] == "sliding_attention")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


CONFIG_KEYS = tuple(ModelConfig.__dataclass_fields__)
META_KEYS = ("format", "format_version", "converter_version", "config", "max_context", "quantization", "sparsity",
             "steering", "external_data", "kv_cache", "tokenizer", "calibration", "source")
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                        "num_kv_heads", "head_dim")


def check_meta(meta: dict, where: str = META_FILE) -> None:
    """Raise ValueError (one line) unless `meta` is an edgeact.json this version reads."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where} is not an edgeact model description")
    v = meta.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {v!r}; this edgeact ({VERSION}) reads up to "
                         f"{FORMAT_VERSION}: upgrade edgeact or reconvert the model")
    cfg = meta.get("config")
    missing = [k for k in REQUIRED_CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{where}: config lacks {', '.join(missing)}")
    q = meta.get("quantization") or {}
    if q.get("group_size") is not None and q.get("weights") in ("int4", "int8"):
        why = check_block_size(q["group_size"], engines=("ort",))
        if why:
            raise ValueError(f"{where}: {why}")
