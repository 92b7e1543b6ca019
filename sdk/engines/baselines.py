"""The baselines `edgeact bench` races, behind the same Engine interface as ours: torch
(transformers on the source weights, fp32) and llama.cpp through its Python binding (on a GGUF
of the same weights). Neither steers nor masks neurons; both need the workstation install."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Engine


def source_of(folder: Path, meta: dict):
    """The SourceModel a folder was converted from, or None when its source file is gone."""
    from edgeact.contract import ModelConfig

    prov = meta.get("source", {})
    if prov.get("format") == "random":
        from edgeact.converters.random_model import random_source

        return random_source(ModelConfig.from_dict(meta["config"]), seed=prov.get("seed", 0))
    path = prov.get("path")
    if path and Path(path).exists():
        from edgeact.converters.readers import read_source

        return read_source(path)
    return None


class _Baseline(Engine):
    def set_steering(self, layer, add=None, ablate=None) -> None:
        raise ValueError(f"the {self.name} engine does not steer (use native or ort)")

    def clear_steering(self) -> None:
        pass

    def _check_plain(self) -> None:
        if self.core_keep is not None:
            raise ValueError(f"the {self.name} engine cannot run a CoreInfer folder (its neuron masks are ours)")


class TorchEngine(_Baseline):
    """transformers' model on the folder's source weights (fp32), with its KV cache."""

    name = "torch"

    def __init__(self, folder, threads: int | None = None):
        super().__init__(folder)
        self._check_plain()
        import torch

        from edgeact.converters.torch_ref import build_torch_model

        src = source_of(self.folder, self.meta)
        if src is None:
            raise ValueError(f"{self.folder}: the source weights it was converted from are not found")
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = build_torch_model(src)
        self._past = None

    def _reset(self) -> None:
        self._past = None
        self.n_past = 0

    def _forward(self, ids, *, output_hidden: bool = False, last: bool = False):
        if output_hidden:
            raise ValueError("the torch engine does not return hidden states")
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(ids)[None]
            # logits_to_keep=1: transformers runs lm_head on the last row only
            kw = {"logits_to_keep": 1} if last else {}
            out = self.model(x, past_key_values=self._past, use_cache=True, **kw)
        self._past = out.past_key_values
        self.n_past += ids.size
        self.logit_rows += 1 if last else ids.size
        return out.logits[0].float().numpy()


class LlamaCppEngine(_Baseline):
    """llama.cpp through llama-cpp-python on `gguf` (the same weights, llama.cpp's quantization)."""

    name = "llama.cpp-py"

    def __init__(self, folder, gguf, threads: int | None = None, n_ctx: int = 512, logits_all: bool = False):
        super().__init__(folder)
        self._check_plain()
        try:
            import llama_cpp
        except ImportError:
            raise ValueError("the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python "
                             "(it compiles llama.cpp, about 15 minutes on 2 cores)") from None
        self._llama_cpp = llama_cpp
        threads = threads or _default_threads()
        # one batch holds a whole prompt, as llama-bench's pp test
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.logits_all = logits_all
        self.max_context = n_ctx

    def _reset(self) -> None:
        self.llm.reset()
        self.n_past = 0

    def _forward(self, ids, *, output_hidden: bool = False, last: bool = False):
        if output_hidden:
            raise ValueError("the llama.cpp engine does not return hidden states")
        if not last and not self.logits_all:
            raise ValueError("this llama.cpp engine was loaded without logits_all: ask for logits='last'")
        self.llm.eval(ids.tolist())
        self.n_past = self.llm.n_tokens
        self.logit_rows += ids.size if self.logits_all else 1
        if self.logits_all:
            rows = 1 if last else ids.size
            return np.asarray(self.llm.scores[self.n_past - rows:self.n_past], dtype=np.float32)
        # without logits_all the binding keeps no copy: read llama.cpp's last row in place
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))[None].copy()


def _default_threads() -> int:
    from edgeact.bench import physical_cores

    return physical_cores()
