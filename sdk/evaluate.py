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
                 seed: int = 0, progress: bool = False):
        from edgeact.converters.model import SourceModel
        from edgeact.converters.readers import read_source
        from edgeact.converters.torch_ref import build_torch_model

        if n_tokens < 2:
            raise ValueError(f"evaluation needs at least 2 tokens, got {n_tokens}")
        self.progress = progress
        self.src = src if isinstance(src, SourceModel) else read_source(src)
        self.model = build_torch_model(self.src, progress=progress)
        if ids is None:
            ids = self.tokens(text, n_tokens, seed)
        self.ids = np.asarray(ids, dtype=np.int64)
        ctx = self.src.config.max_position_embeddings
        if len(self.ids) > ctx:
            raise ValueError(f"{len(self.ids)} evaluation tokens exceed the model's context of {ctx}")
        self.logits = self._logits()

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


def evaluate(model_dir, ref_src, *, text: str | None = None, n_tokens: int = 256, seed: int = 0,
             engine: str = "ort", progress: bool = False) -> dict:
    ref = Reference(ref_src, text=text, n_tokens=n_tokens, seed=seed, progress=progress)
    q = ref.compare(Path(model_dir), engine=engine)
    return {"model": str(model_dir), "reference": str(ref_src), "engine": engine,
            "tokens_source": "text" if text is not None else f"sampled from the fp32 reference (seed {seed})",
            **q.to_dict()}
