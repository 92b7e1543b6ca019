"""The interface every engine implements; the SDK (generation, steering, eval,
bench) talks only to this."""
from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np

from edgeact.contract import check_meta


def read_meta(folder) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists() and folder.suffix in (".gguf", ".bin", ".safetensors"):
            raise ValueError(f"{folder} is a source checkpoint, not a model folder: convert it first with "
                             f"`edgeact convert {folder} -o OUT_DIR`")
        if folder.exists():
            raise ValueError(f"{folder} is a file, not a model folder (a folder with edgeact.json and model.onnx "
                             f"that `edgeact convert` writes)")
        raise ValueError(f"model folder not found: {folder}")
    meta_path = folder / "edgeact.json"
    if not meta_path.is_file():
        if (folder / "config.json").exists():
            raise ValueError(f"{folder} is a Hugging Face folder, not an edgeact model folder: convert it first "
                             f"with `edgeact convert {folder} -o OUT_DIR`")
        raise ValueError(f"{folder} has no edgeact.json: not an edgeact model folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    check_meta(meta, str(meta_path))
    return meta


class Engine(abc.ABC):
    """A decoder with its KV cache. Batch 1; tokens are appended after `n_past`."""

    name: str = "?"

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        cfg = self.meta["config"]
        self.num_layers: int = cfg["num_layers"]
        self.hidden_size: int = cfg["hidden_size"]
        self.vocab_size: int = cfg["vocab_size"]
        self.max_context: int = self.meta.get("max_context", cfg.get("max_position_embeddings", 2048))
        self.n_past = 0
        sp = self.meta.get("sparsity") or {}
        # CoreInfer: `keep` FFN neurons per layer, chosen from the prompt (converters/coreinfer.py)
        self.core_keep: int | None = sp.get("keep") if sp.get("method") == "coreinfer" else None
        self.core_masks: np.ndarray | None = None   # the neuron set in force, [layers, FFN width]
        # logit rows the engine computed (the vocabulary projection is the widest matmul): what
        # logits="last" saves is visible here, and a test holds the prompt pass to one row
        self.logit_rows = 0

    # ---- the interface
    def reset(self) -> None:
        """Drop the KV cache (and a CoreInfer neuron set: the next prompt chooses a new one)."""
        self._reset()
        if self.core_keep is not None:
            self.core_masks = None
            self.set_neuron_masks(None)

    def truncate(self, n_past: int) -> None:
        """Keep the first n_past cached tokens: a conversation whose prefix diverged continues from
        the common part. With CoreInfer the neuron set belongs to the whole prompt, so only 0 is kept."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"truncate to {n_past}: the cache holds {self.n_past} tokens")
        if n_past == 0:
            self.reset()
        elif n_past < self.n_past:
            if self.core_keep is not None:
                raise ValueError("a CoreInfer folder's cache cannot be truncated (its neuron set comes from "
                                 "the whole prompt): reset instead")
            self._truncate(n_past)
            self.n_past = n_past

    def _truncate(self, n_past: int) -> None:
        raise NotImplementedError

    def fork(self) -> "Engine":
        """A second engine on the same loaded weights with its own KV cache and steering."""
        raise NotImplementedError(f"the {self.name} engine cannot share its weights with another session")

    @property
    def memory_bytes(self) -> int:
        """Bytes this engine's cache and buffers hold beyond the shared weights."""
        raise NotImplementedError

    def forward(self, ids: np.ndarray, *, logits: str = "all", output_hidden: bool = False):
        """Run `ids` (int64 [S]) at positions n_past..n_past+S-1. Returns logits float32 [S, vocab]
        (logits="all") or [1, vocab] for the last position only (logits="last": what a prompt pass
        before generation needs; an engine that can skips the other rows of the vocabulary
        projection). With output_hidden also hidden [num_layers, S, hidden] (each layer's Steer
        output). With CoreInfer the first call after a reset is the prompt: it runs every neuron
        and then fixes each layer's `keep` most-used ones for the calls that follow."""
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', not {logits!r}")
        last = logits == "last"
        return self.run_prompt_aware(lambda x: self._forward(x, output_hidden=output_hidden, last=last), ids)

    def run_prompt_aware(self, run, ids):
        """run(checked ids); with CoreInfer, the first call after a reset then fixes the neuron set."""
        ids = self.check_ids(ids)
        prompt = self.core_keep is not None and self.n_past == 0
        out = run(ids)
        if prompt:
            self.fix_core_neurons()
        return out

    def fix_core_neurons(self) -> None:
        """CoreInfer: keep, from now until reset, the neurons the last forward (the prompt) used most."""
        self.core_masks = choose_core_neurons(self.neuron_scores(), self.core_keep)
        self.set_neuron_masks(self.core_masks)

    @abc.abstractmethod
    def _reset(self) -> None:
        ...

    @abc.abstractmethod
    def _forward(self, ids: np.ndarray, *, output_hidden: bool = False, last: bool = False):
        """logits [S, vocab], or [1, vocab] when `last`; adds the rows computed to logit_rows."""

    def neuron_scores(self) -> np.ndarray:
        """CoreInfer: ffn_score.{i} of the last forward, [layers, FFN width]."""
        raise ValueError("this model folder has no CoreInfer neuron masks (convert with --sparsity-method coreinfer)")

    def set_neuron_masks(self, masks: np.ndarray | None) -> None:
        """CoreInfer: [layers, FFN width] masks (0 = neuron skipped), or None for all neurons."""
        raise ValueError("this model folder has no CoreInfer neuron masks (convert with --sparsity-method coreinfer)")

    def check_masks(self, masks) -> np.ndarray:
        width = self.meta["config"]["intermediate_size"]
        masks = np.ascontiguousarray(masks, dtype=np.float32)
        if masks.shape != (self.num_layers, width):
            raise ValueError(f"neuron masks have shape {masks.shape}, expected ({self.num_layers}, {width})")
        if not np.isfinite(masks).all():
            raise ValueError("neuron masks contain NaN or Inf")
        return masks

    @abc.abstractmethod
    def set_steering(self, layer: int, add: np.ndarray | None = None, ablate: np.ndarray | None = None) -> None:
        """add [hidden] is added after `layer`; ablate [R, hidden] unit rows are projected out first."""

    @abc.abstractmethod
    def clear_steering(self) -> None:
        ...

    # ---- shared checks
    def check_ids(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            raise ValueError("no tokens to run")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range (vocabulary size {self.vocab_size})")
        if self.n_past + ids.size > self.max_context:
            raise ValueError(f"context overflow: {self.n_past} cached + {ids.size} new tokens > "
                             f"max context {self.max_context}")
        return ids

    def check_steering(self, layer: int, add, ablate):
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"steering layer {layer} out of range (model has layers 0..{self.num_layers - 1})")
        if add is not None:
            add = np.ascontiguousarray(add, dtype=np.float32)
            if add.shape != (self.hidden_size,):
                raise ValueError(f"steering vector has shape {add.shape}, expected ({self.hidden_size},)")
            if not np.isfinite(add).all():
                raise ValueError("steering vector contains NaN or Inf")
        if ablate is not None:
            ablate = np.ascontiguousarray(ablate, dtype=np.float32)
            if ablate.ndim == 1:
                ablate = ablate[None]
            if ablate.ndim != 2 or ablate.shape[1] != self.hidden_size or ablate.shape[0] == 0:
                raise ValueError(f"ablation directions have shape {ablate.shape}, expected (R, {self.hidden_size})")
            if not np.isfinite(ablate).all():
                raise ValueError("ablation direction contains NaN or Inf")
        return int(layer), add, ablate


def choose_core_neurons(scores: np.ndarray, keep: int) -> np.ndarray:
    """CoreInfer's sentence-wise core neurons: per layer the `keep` best-scored of [layers, I] scores
    (ties to the lower index) as a float32 0/1 mask."""
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.zeros(scores.shape, np.float32)
    np.put_along_axis(masks, np.argsort(-scores, axis=-1, kind="stable")[:, :keep], 1.0, axis=-1)
    return masks
