"""onnxruntime on the model folder: the reference every native result is compared with,
and the fallback where the native runtime is not built."""
from __future__ import annotations

import numpy as np

from .base import Engine


def default_threads() -> int:
    from edgeact.bench import physical_cores

    return physical_cores()


class OrtEngine(Engine):
    name = "ort"

    def __init__(self, folder, threads: int | None = None):
        super().__init__(folder)
        from edgeact.extras import require

        ort = require("onnxruntime", "the onnxruntime engine (engine='ort')")

        self._ort = ort
        self.threads = threads or default_threads()
        kv = self.meta.get("kv_cache") or {"num_kv_heads": self.meta["config"]["num_kv_heads"],
                                           "head_dim": self.meta["config"]["head_dim"]}
        self.kv_heads, self.kv_dim = kv["num_kv_heads"], kv["head_dim"]
        self._session = self._make_session()
        self._hidden_session = None  # built on first output_hidden request
        # steer.* are initializers that double as inputs: onnxruntime lists them as overridable, not as inputs
        self._inputs = {i.name for i in self._session.get_inputs()} | \
            {i.name for i in self._session.get_overridable_initializers()}
        self._steer: dict[str, np.ndarray] = {}
        self.extra_inputs: dict[str, np.ndarray] = {}  # e.g. sparsity masks set by the SDK
        self.reset()

    def _options(self):
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # steer.* initializers double as inputs by design: silence that warning
        return so

    def _make_session(self, model_bytes: bytes | None = None):
        path = str(self.folder / "model.onnx")
        return self._ort.InferenceSession(model_bytes if model_bytes is not None else path, self._options(),
                                          providers=["CPUExecutionProvider"])

    def _hidden(self):
        """A second session whose outputs include every layer's `hidden.{i}`."""
        if self._hidden_session is None:
            self._hidden_session = self.session_with_outputs([f"hidden.{i}" for i in range(self.num_layers)])
        return self._hidden_session

    def session_with_outputs(self, names):
        """A session on the same graph whose outputs also include the intermediate tensors `names`."""
        from edgeact.extras import require

        onnx = require("onnx", "intermediate tensors on the onnxruntime engine")

        model = onnx.load(str(self.folder / "model.onnx"), load_external_data=False)
        have = {o.name for o in model.graph.output}
        for n in names:
            if n not in have:
                model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
        if not self.meta.get("external_data"):
            return self._make_session(model.SerializeToString())
        # External data resolves relative to the file: save the edited graph beside it.
        import tempfile

        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".onnx", delete=True) as f:
            onnx.save_model(model, f.name)
            return self._ort.InferenceSession(f.name, self._options(), providers=["CPUExecutionProvider"])

    def probe(self, ids, names) -> dict:
        """The tensors `names` when `ids` run as a fresh sequence (the KV cache is left reset)."""
        ids = self.check_ids(ids)
        self.reset()
        feed = {"input_ids": ids[None], "seqlens_k": np.array([ids.size - 1], np.int32),
                "total_sequence_length": np.array(ids.size, np.int32)}
        for i, (k, v) in enumerate(self._past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        feed.update(self._steer)
        feed.update({k: v for k, v in self.extra_inputs.items() if k in self._inputs})
        return dict(zip(names, self.session_with_outputs(names).run(list(names), feed)))

    def _reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.kv_dim), dtype=np.float32)
        self._past = [(empty, empty) for _ in range(self.num_layers)]
        self.n_past = 0

    def _truncate(self, n_past: int) -> None:
        self._past = [(k[:, :, :n_past], v[:, :, :n_past]) for k, v in self._past]

    def fork(self) -> "OrtEngine":
        import copy

        twin = copy.copy(self)  # shares the InferenceSession (its run() is thread-safe)
        twin._steer, twin.extra_inputs = {}, {}
        twin.core_masks = None
        twin._reset()
        return twin

    @property
    def memory_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._past)

    def _forward(self, ids, *, output_hidden: bool = False, last: bool = False):
        S, P = ids.size, self.n_past
        feed = {"input_ids": ids[None], "seqlens_k": np.array([P + S - 1], dtype=np.int32),
                "total_sequence_length": np.array(P + S, dtype=np.int32)}
        for i, (k, v) in enumerate(self._past):
            feed[f"past_key_values.{i}.key"] = k
            feed[f"past_key_values.{i}.value"] = v
        feed.update(self._steer)
        feed.update({k: v for k, v in self.extra_inputs.items() if k in self._inputs})
        sess = self._hidden() if output_hidden else self._session
        names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        if output_hidden:
            names += [f"hidden.{i}" for i in range(self.num_layers)]
        if self.core_keep is not None:
            names += [f"ffn_score.{i}" for i in range(self.num_layers)]
        out = sess.run(names, feed)
        if self.core_keep is not None:
            self._scores, out = np.stack(out[-self.num_layers:]), out[:-self.num_layers]
        self._past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        self.n_past = P + S
        # the graph's logits output covers every row: onnxruntime computes them all
        self.logit_rows += S
        logits = out[0][0][-1:] if last else out[0][0]
        if output_hidden:
            return logits, np.stack([h[0] for h in out[1 + 2 * self.num_layers:]])
        return logits

    def set_steering(self, layer: int, add=None, ablate=None) -> None:
        layer, add, ablate = self.check_steering(layer, add, ablate)
        if f"steer.{layer}.add" not in self._inputs:
            raise ValueError("this model folder was converted without steering points (convert with steering on)")
        for key, val in ((f"steer.{layer}.add", add), (f"steer.{layer}.ablate", ablate)):
            if val is None:
                self._steer.pop(key, None)
            else:
                self._steer[key] = val

    def clear_steering(self) -> None:
        self._steer.clear()

    def neuron_scores(self) -> np.ndarray:
        if self.core_keep is None:
            return super().neuron_scores()
        return self._scores

    def set_neuron_masks(self, masks) -> None:
        if self.core_keep is None:
            return super().set_neuron_masks(masks)
        masks = None if masks is None else self.check_masks(masks)
        for i in range(self.num_layers):
            if masks is None:
                self.extra_inputs.pop(f"ffn_mask.{i}", None)
            else:
                self.extra_inputs[f"ffn_mask.{i}"] = masks[i]
