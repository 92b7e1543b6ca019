"""The C runtime (native/, through edgeact.runtime) behind the Engine interface."""
from __future__ import annotations

import numpy as np

from .base import Engine


class NativeEngine(Engine):
    name = "native"

    def __init__(self, folder, threads: int | None = None, n_ctx: int | None = None, max_chunk: int | None = None,
                 low_memory: bool = False):
        super().__init__(folder)
        from edgeact.runtime import NativeModel

        self.model = NativeModel(self.folder, low_memory=low_memory)
        if self.model.vocab != self.vocab_size or self.model.n_layers != self.num_layers:
            raise ValueError(f"{self.folder}: model.onnx (vocab {self.model.vocab}, {self.model.n_layers} layers) "
                             f"does not match edgeact.json (vocab {self.vocab_size}, {self.num_layers} layers)")
        self._session_args = dict(threads=threads or 0, n_ctx=n_ctx or 0, max_chunk=max_chunk or 0)
        self.session = self.model.session(**self._session_args)
        self.threads = self.session.threads
        # the cache is sized once; check_ids in the base class guards against overflow with this bound
        self.max_context = self.session.n_ctx
        self.repacked_bytes = self.model.weight_bytes["repacked"]
        self._capturing = False

    @property
    def isa(self) -> str:
        return self.model.isa

    def _reset(self) -> None:
        self.session.reset()
        self.n_past = 0

    def _truncate(self, n_past: int) -> None:
        self.session.truncate(n_past)

    def fork(self) -> "NativeEngine":
        import copy

        twin = copy.copy(self)  # shares self.model, the loaded weights
        twin.session = self.model.session(**self._session_args)
        twin._capturing = False
        twin.n_past = 0
        twin.core_masks = None
        return twin

    @property
    def memory_bytes(self) -> int:
        return self.session.memory_bytes

    def _forward(self, ids, *, output_hidden: bool = False, last: bool = False):
        if output_hidden != self._capturing:
            self.session.capture_hidden(output_hidden)
            self._capturing = output_hidden
        # all_logits=False: the runtime runs the vocabulary projection on the last row only
        logits = self.session.forward(ids, all_logits=not last)
        self.logit_rows += 1 if last else ids.size
        if last:
            logits = logits[None]
        self.n_past = self.session.n_past
        if output_hidden:
            return logits, self.session.hidden_states()
        return logits

    def set_steering(self, layer: int, add=None, ablate=None) -> None:
        layer, add, ablate = self.check_steering(layer, add, ablate)
        if self.model.n_steer_layers == 0:
            raise ValueError("this model folder was converted without steering points (convert with steering on)")
        self.session.set_steering(layer, add=add, ablate=ablate)

    def clear_steering(self) -> None:
        if self.model.n_steer_layers:
            self.session.clear_steering()

    def neuron_scores(self) -> np.ndarray:
        if self.core_keep is None:
            return super().neuron_scores()
        return self.session.neuron_scores()

    def set_neuron_masks(self, masks) -> None:
        if self.core_keep is None:
            return super().set_neuron_masks(masks)
        masks = None if masks is None else self.check_masks(masks)
        for i in range(self.num_layers):
            self.session.set_neuron_mask(i, None if masks is None else masks[i])

    # ---- profiler (native only)
    def profile(self, on: bool = True) -> None:
        self.session.profile(on)

    def profile_reset(self) -> None:
        self.session.profile_reset()

    def profile_records(self) -> list[dict]:
        """Per node, in execution order: name, op_type, calls, ns, weight_bytes."""
        return self.session.profile_records()

    def profile_table(self) -> str:
        from edgeact.runtime import format_profile

        return format_profile(self.profile_records(), isa=self.isa)
