"""Quality of a converted folder against its fp32 source on the same tokens:
mean KL(ref‖model) in nats/token of next-token distributions, top-1 agreement,
perplexity of both. The reference runs once; any number of folders compare to it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class Quality:
    kl: float            # mean KL(ref ‖ model), nats/token
    top1: float          # share of positions where the argmaxes agree
    ppl_model: float
    ppl_ref: float
    n_tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_model / self.ppl_ref

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


def compare_logits(model_logits: np.ndarray, ref_logits: np.ndarray, ids: np.ndarray) -> Quality:
    """Logits [T, V] at positions 0..T-1 predict ids[1..T]; the last position has no target."""
    lm, lr = log_softmax(model_logits[:-1]), log_softmax(ref_logits[:-1])
    tgt = np.asarray(ids)[1:len(lm) + 1]
    kl = float((np.exp(lr) * (lr - lm)).sum(-1).mean())
    top1 = float((lm.argmax(-1) == lr.argmax(-1)).mean())
    rows = np.arange(len(tgt))
    return Quality(kl=kl, top1=top1, ppl_model=float(np.exp(-lm[rows, tgt].mean())),
                   ppl_ref=float(np.exp(-lr[rows, tgt].mean())), n_tokens=len(tgt))


class Reference:
    """The fp32 source model (transformers) and the evaluation tokens, built once.
    progress: tqdm bars for loading the weights, sampling the tokens and the reference logits."""

    def __init__(self, src, ids: np.ndarray | None = None, *, text: str | None = None, n_tokens: int = 256,
                 seed: int = 0, progress: bool = False, cache_dir=None):
        from edgeact.converters.model import SourceModel
        from edgeact.converters.readers import read_source

        if n_tokens < 2:
            raise ValueError(f"evaluation needs at least 2 tokens, got {n_tokens}")
        self.progress = progress
        self.src = src if isinstance(src, SourceModel) else read_source(src)
        self._model = None
        # A large source takes minutes to load and run in fp32: with `cache_dir`, the tokens and
        # logits of a file source are kept, keyed by the file's identity and the token settings.
        cached = None if cache_dir is None or isinstance(src, SourceModel) or ids is not None else \
            Path(cache_dir) / f"{_reference_key(src, text, n_tokens, seed)}.npz"
        if cached is not None and cached.is_file():
            with np.load(cached) as z:
                self.ids, self.logits = z["ids"], z["logits"]
            return
        if ids is None:
            ids = self.tokens(text, n_tokens, seed)
        self.ids = np.asarray(ids, dtype=np.int64)
        ctx = self.src.config.max_position_embeddings
        if len(self.ids) > ctx:
            raise ValueError(f"{len(self.ids)} evaluation tokens exceed the model's context of {ctx}")
        self.logits = self._logits()
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npz")
            np.savez(tmp, ids=self.ids, logits=self.logits)
            tmp.replace(cached)

    @property
    def model(self):
        """The fp32 transformers model, built on first use."""
        if self._model is None:
            from edgeact.converters.torch_ref import build_torch_model

            self._model = build_torch_model(self.src, progress=self.progress)
        return self._model

    def _logits(self) -> np.ndarray:
        """The reference's logits at every position: one forward pass, its progress counted per layer."""
        import torch
        from tqdm import tqdm

        layers = self.model.model.layers
        with tqdm(total=len(layers), desc=f"reference logits ({len(self.ids)} tokens)", unit="layer",
                  disable=not self.progress) as bar:
            def tick(*_):   # a forward hook's return value would replace the block's output
                bar.update(1)

            hooks = [block.register_forward_hook(tick) for block in layers]
            try:
                with torch.no_grad():
                    return self.model(torch.from_numpy(self.ids)[None]).logits[0].numpy()
            finally:
                for h in hooks:
                    h.remove()

    def tokens(self, text, n_tokens, seed) -> np.ndarray:
        cfg = self.src.config
        if text is not None:
            if not self.src.tokenizer_json:
                raise ValueError("--text needs a tokenizer, and this source has none: omit --text to sample tokens")
            from tokenizers import Tokenizer

            ids = Tokenizer.from_str(self.src.tokenizer_json).encode(text).ids
            if len(ids) < 2:
                raise ValueError("evaluation text has fewer than 2 tokens")
            return np.asarray(ids[: n_tokens + 1], dtype=np.int64)
        from edgeact.converters.sampling import sample_ids

        return sample_ids(self.model, n_tokens, seed=seed, bos_id=cfg.bos_token_id, progress=self.progress,
                          desc="sampling evaluation text")

    def compare(self, model_or_folder, engine: str = "ort") -> Quality:
        from edgeact.api import Model, load

        model = model_or_folder if isinstance(model_or_folder, Model) else load(model_or_folder, engine=engine)
        if model.config.vocab_size != self.src.config.vocab_size:
            raise ValueError(f"{model.folder} has vocabulary {model.config.vocab_size}, the reference "
                             f"{self.src.config.vocab_size}: not the same model")
        if model.engine.core_keep is None:
            return compare_logits(model.forward(self.ids), self.logits, self.ids)
        # CoreInfer chooses its neurons on a prompt: the first quarter of the tokens (at least 16)
        # is the prompt, and quality is measured on the continuation, where the choice applies
        P = min(max(16, len(self.ids) // 4), len(self.ids) - 2)
        logits = model.forward(self.ids, prompt_len=P)
        return compare_logits(logits[P:], self.logits[P:], self.ids[P:])


def _reference_key(src, text, n_tokens: int, seed: int) -> str:
    """A hash of the source's files (path, size, mtime), the token settings and the versions that make the logits."""
    import hashlib
    import json

    import torch
    import transformers

    path = Path(src).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    ident = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    from edgeact import __version__

    key = json.dumps({"files": ident, "text": hashlib.sha256(text.encode()).hexdigest() if text is not None else None,
                      "n_tokens": n_tokens, "seed": seed, "edgeact": __version__, "torch": torch.__version__,
                      "transformers": transformers.__version__})
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def evaluate(model_dir, ref_src, *, text: str | None = None, n_tokens: int = 256, seed: int = 0,
             engine: str = "ort", progress: bool = False) -> dict:
    ref = Reference(ref_src, text=text, n_tokens=n_tokens, seed=seed, progress=progress)
    q = ref.compare(Path(model_dir), engine=engine)
    return {"model": str(model_dir), "reference": str(ref_src), "engine": engine,
            "tokens_source": "text" if text is not None else f"sampled from the fp32 reference (seed {seed})",
            **q.to_dict()}


# ---- llama.cpp's own quantizations of the same source, for `edgeact eval --against-llama-cpp`

def folder_bytes(folder) -> int:
    """Bytes of a folder's weights: model.onnx and its external data (the tokenizer is left out)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob("model.onnx*") if p.is_file())


def llama_cpp_quantize(src_gguf, dst, ftype: str, threads: int = 0) -> Path:
    """llama.cpp's llama_model_quantize on `src_gguf` (re-quantizing a quantized source is allowed,
    as `llama-quantize --allow-requantize` does)."""
    import ctypes

    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError("--against-llama-cpp needs llama-cpp-python (pip install llama-cpp-python)") from e
    name = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"
    if not hasattr(llama_cpp, name):
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"llama.cpp has no type {ftype!r}; known: {', '.join(known)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.nthread = threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp failed to quantize {src_gguf} to {ftype} (code {rc})")
    return Path(dst)


def llama_cpp_logits(gguf_path, ids: np.ndarray, threads: int = 2) -> np.ndarray:
    """Logits [T, V] of llama.cpp's own engine on token ids (one batch, every position)."""
    import llama_cpp

    ids = [int(i) for i in ids]
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids) + 8), n_batch=len(ids),
                          n_ubatch=len(ids), logits_all=True, n_threads=threads, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def against_llama_cpp(ref: Reference, src_gguf, types, workdir, *, threads: int = 2,
                      include_source: bool = True, progress: bool = True) -> list[dict]:
    """One row per llama.cpp type (and the source file itself, run by llama.cpp): quality against
    `ref` on ref.ids, and the file's bytes. Quantized files go to `workdir` and are reused."""
    from tqdm import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = ([("source", Path(src_gguf))] if include_source else []) + \
        [(t, workdir / f"{Path(src_gguf).stem}.{t}.gguf") for t in types]
    rows = []
    for name, path in tqdm(jobs, desc="llama.cpp", unit="type", disable=not progress):
        if name != "source" and not path.exists():
            llama_cpp_quantize(src_gguf, path.with_suffix(".tmp"), name, threads=threads)
            path.with_suffix(".tmp").rename(path)
        q = compare_logits(llama_cpp_logits(path, ref.ids, threads=threads), ref.logits, ref.ids)
        rows.append({"model": f"llama.cpp {name}", "path": str(path), "bytes": path.stat().st_size, **q.to_dict()})
    return rows


def plot_kl_vs_size(rows: list[dict], path, title: str = "") -> Path:
    """KL (log scale) against bytes, one point per row, llama.cpp's and edgeact's in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels: dict[tuple, list[str]] = {}   # rows on one point (a re-quantization that kept the file) share a label
    for r in rows:
        ours = not r["model"].startswith("llama.cpp")
        xy = (r["bytes"] / 1e6, max(r["kl"], 1e-6))
        ax.scatter(*xy, color="tab:blue" if ours else "tab:orange", marker="o" if ours else "s")
        labels.setdefault(xy, []).append(Path(r["model"]).name if ours else r["model"].replace("llama.cpp ", ""))
    for xy, names in labels.items():
        ax.annotate(" = ".join(names), xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([], [], color="tab:blue", marker="o", label="edgeact")
    ax.scatter([], [], color="tab:orange", marker="s", label="llama.cpp")
    ax.set_yscale("log")
    ax.set_xlabel("weights (MB)")
    ax.set_ylabel("KL vs fp32 (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
