"""Steering vectors: add (h + α·v) or ablate (h − (h·v̂)v̂) at the residual stream after chosen layers.

The graph has a steering point after every layer (`ai.edgeact.Steer(h, add, ablate)`,
docs/model-folder.md); an engine exposes it as `set_steering(layer, add, ablate)` and
`clear_steering()`. This module turns what a user asks for (vectors, control-vector
files, scales, layers, modes) into those per-layer inputs:
  * adds of all active vectors at a layer are summed (scaled per layer);
  * ablation directions at a layer are stacked as rows and orthonormalized, so the
    projection removes their whole span once (Steer ablates before it adds);
  * `apply_to="generated"` vectors are switched on only for decode steps: the SDK
    calls `steering_phase(generated=True)` after the prefill.
Everything is validated before anything changes, so a bad request leaves the model
exactly as it was.

`SteeringMixin` gives a Model `steer`, `clear_steering` and `with m.steering(...)`;
`add_steering_args`/`apply_steering_args` give the `run` command its `--steer` options.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .control_vector import load_control_vector

MODES = ("add", "ablate")
APPLY_TO = ("all", "generated")
_ORTHO_TOL = 1e-6  # singular values below this (relative) are dependent directions, dropped


@dataclass(frozen=True)
class SteeringEntry:
    """One validated request: per-layer vectors with their scales already applied (add) or unit rows (ablate)."""
    mode: str
    apply_to: str
    vectors: Mapping[int, np.ndarray]


class Steering:
    """The steering requests active on one model, and the per-layer engine inputs they make."""

    def __init__(self, num_layers: int, hidden_size: int):
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        self.entries: list[SteeringEntry] = []

    def make_entry(self, vec_or_path, scale=1.0, layers=None, mode="add", apply_to="all") -> SteeringEntry:
        """Validate one request without changing anything (ValueError names the problem)."""
        if mode not in MODES:
            raise ValueError(f"steering mode must be one of {', '.join(MODES)}, got {mode!r}")
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {', '.join(APPLY_TO)}, got {apply_to!r}")
        directions = as_directions(vec_or_path, self.num_layers, self.hidden_size, layers)
        scales = _scales(scale, directions)
        if mode == "add":
            vectors = {l: (v * np.float32(scales[l])).astype(np.float32)
                       for l, v in directions.items() if scales[l] != 0.0}
        else:
            for l, s in scales.items():
                if s not in (0.0, 1.0):
                    raise ValueError(f"ablation removes a direction entirely: scale must be 1 (or 0 to skip "
                                     f"the layer), got {s} at layer {l}")
            vectors = {l: v for l, v in directions.items() if scales[l] == 1.0}
        return SteeringEntry(mode, apply_to, vectors)

    def layer_inputs(self, generated: bool) -> dict[int, tuple[np.ndarray | None, np.ndarray | None]]:
        """{layer: (add [hidden] or None, ablate [R, hidden] orthonormal rows or None)} for one phase.

        Layers where nothing is left (zero sum, zero directions) are omitted so they run unsteered exactly.
        """
        adds: dict[int, np.ndarray] = {}
        ablates: dict[int, list[np.ndarray]] = {}
        for e in self.entries:
            if e.apply_to == "generated" and not generated:
                continue
            for l, v in e.vectors.items():
                if e.mode == "add":
                    adds[l] = adds[l] + v if l in adds else v.copy()
                else:
                    ablates.setdefault(l, []).append(v)
        out = {}
        for l in sorted(set(adds) | set(ablates)):
            add = adds.get(l)
            if add is not None and not np.any(add):
                add = None
            ablate = orthonormal_rows(np.stack(ablates[l])) if l in ablates else None
            if ablate is not None and ablate.shape[0] == 0:
                ablate = None
            if add is not None or ablate is not None:
                out[l] = (add, ablate)
        return out

    @property
    def phase_dependent(self) -> bool:
        return any(e.apply_to == "generated" for e in self.entries)

    def apply(self, engine, generated: bool = False) -> None:
        """Put this phase's inputs into `engine` (everything else unsteered)."""
        inputs = self.layer_inputs(generated)
        rows = max((a.shape[0] for _, a in inputs.values() if a is not None), default=1)
        if rows > 1:
            # Every steer.{i}.ablate input shares the symbolic dim "R" in the graph, and onnxruntime
            # holds it to one value across layers: give all layers R rows (zero rows remove nothing).
            pad = np.zeros((rows, self.hidden_size), np.float32)
            for layer in range(self.num_layers):
                add, ablate = inputs.get(layer, (None, None))
                if ablate is None:
                    ablate = pad
                elif ablate.shape[0] < rows:
                    ablate = np.concatenate([ablate, pad[: rows - ablate.shape[0]]])
                inputs[layer] = (add, ablate)
        engine.clear_steering()
        for layer, (add, ablate) in sorted(inputs.items()):
            engine.set_steering(layer, add=add, ablate=ablate)


class SteeringMixin:
    """Steering methods for a Model with `.engine` and `.config` (ModelConfig: num_layers, hidden_size)."""

    def _steering_state(self) -> Steering:
        state = getattr(self, "_steering", None)
        if state is None:
            state = Steering(self.config.num_layers, self.config.hidden_size)
            self._steering = state
        return state

    def steer(self, vec_or_path, scale=1.0, layers=None, mode="add", apply_to="all") -> SteeringEntry:
        """Add a steering vector (array, {layer: array}, [layers, hidden] array or control-vector .gguf path).

        `scale` is a number or {layer: number}; `layers` an int, list or "A-B" string (default:
        every layer the vector has, all layers for a single [hidden] vector). Returns the entry,
        which `unsteer` removes again.
        """
        state = self._steering_state()
        entry = state.make_entry(vec_or_path, scale, layers, mode, apply_to)
        state.entries.append(entry)
        self._push_steering(state, undo=lambda: state.entries.remove(entry))
        return entry

    def unsteer(self, entry: SteeringEntry) -> None:
        state = self._steering_state()
        if entry not in state.entries:
            raise ValueError("this steering entry is not active on the model")
        state.entries.remove(entry)
        self._push_steering(state, undo=lambda: state.entries.append(entry))

    def clear_steering(self) -> None:
        self._steering_state().entries.clear()
        self.engine.clear_steering()

    @contextmanager
    def steering(self, vec_or_path, scale=1.0, layers=None, mode="add", apply_to="all"):
        """`with m.steering(v, scale=4, layers=[10]): ...` — steered inside, previous state after."""
        entry = self.steer(vec_or_path, scale, layers, mode, apply_to)
        try:
            yield self
        finally:
            self.unsteer(entry)

    def steering_phase(self, generated: bool) -> None:
        """Called by generation: False before the prefill, True before the first decode step."""
        state = getattr(self, "_steering", None)
        if state is not None and state.phase_dependent:
            state.apply(self.engine, generated=generated)

    def _push_steering(self, state: Steering, undo) -> None:
        try:
            state.apply(self.engine, generated=False)
        except Exception:
            # The engine refused (it validates too): restore the previous, working state.
            undo()
            state.apply(self.engine, generated=False)
            raise


# --- inputs -----------------------------------------------------------------------------------

def parse_layers(layers, num_layers: int) -> list[int] | None:
    """None, an int, an iterable of ints, or a string like "10-20", "3,5,7" or "2-4,9" → sorted layer list."""
    if layers is None:
        return None
    if isinstance(layers, str):
        out = []
        for part in layers.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"bad layer range {layers!r}: use A-B, A,B,C or a mix (0-based layers)")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise ValueError(f"bad layer range {part!r}: end before start")
            out.extend(range(a, b + 1))
    elif isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        out = [int(layers)]
    else:
        try:
            out = [int(l) for l in layers]
        except (TypeError, ValueError):
            raise ValueError(f"layers must be an int, a list of ints or a string like '10-20', got {layers!r}") from None
    if not out:
        raise ValueError("no layers selected")
    for l in out:
        if not 0 <= l < num_layers:
            raise ValueError(f"layer {l} out of range: the model has layers 0..{num_layers - 1}")
    return sorted(set(out))


def as_directions(vec_or_path, num_layers: int, hidden_size: int, layers=None) -> dict[int, np.ndarray]:
    """Any accepted vector form → {layer: float32 [hidden]}, checked against the model's shape."""
    selected = parse_layers(layers, num_layers)
    if isinstance(vec_or_path, (str, Path)):
        directions = load_control_vector(vec_or_path, hidden_size=hidden_size, num_layers=num_layers)
    elif isinstance(vec_or_path, Mapping):
        directions = {}
        for l, v in vec_or_path.items():
            if isinstance(l, bool) or not isinstance(l, (int, np.integer)):
                raise ValueError(f"vector dict keys must be layer numbers, got {l!r}")
            directions[int(l)] = v
    else:
        arr = np.asarray(vec_or_path)
        if arr.ndim == 1:
            directions = {l: arr for l in (selected if selected is not None else range(num_layers))}
        elif arr.ndim == 2:
            if arr.shape[0] != num_layers:
                raise ValueError(f"a 2-D steering array must be [num_layers={num_layers}, hidden], got {arr.shape}")
            directions = dict(enumerate(arr))
        else:
            raise ValueError(f"a steering vector must be [hidden] or [num_layers, hidden], got shape {arr.shape}")
    if not directions:
        raise ValueError("the steering vector has no layers")
    out = {}
    for l, v in directions.items():
        if not 0 <= l < num_layers:
            raise ValueError(f"layer {l} out of range: the model has layers 0..{num_layers - 1}")
        try:
            v = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"the vector for layer {l} is not numeric") from None
        if v.shape != (hidden_size,):
            raise ValueError(f"the vector for layer {l} has shape {v.shape}, the model's hidden size is {hidden_size}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"the vector for layer {l} contains NaN or Inf")
        out[l] = v
    if selected is not None:
        missing = [l for l in selected if l not in out]
        if missing:
            raise ValueError(f"the steering vector has no direction for layer(s) {missing}; it has {sorted(out)}")
        out = {l: out[l] for l in selected}
    return dict(sorted(out.items()))


def _scales(scale, directions: dict[int, np.ndarray]) -> dict[int, float]:
    if isinstance(scale, Mapping):
        unknown = [l for l in scale if l not in directions]
        if unknown:
            raise ValueError(f"scale given for layer(s) {unknown} that the vector does not steer")
        scales = {l: scale.get(l, 1.0) for l in directions}
    else:
        scales = {l: scale for l in directions}
    for l, s in scales.items():
        try:
            s = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a number, got {s!r}") from None
        if not math.isfinite(s):
            raise ValueError(f"scale must be finite, got {s} at layer {l}")
        scales[l] = s
    return scales


def orthonormal_rows(directions: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning `directions` [n, hidden] (zero and dependent rows dropped)."""
    d = np.asarray(directions, dtype=np.float64)
    norms = np.linalg.norm(d, axis=1)
    d = d[norms > 0] / norms[norms > 0, None]
    if d.shape[0] == 0:
        return np.zeros((0, directions.shape[1]), np.float32)
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    return vt[s > _ORTHO_TOL * s[0]].astype(np.float32)


# --- the numpy definition of a steering point (what Steer computes) -----------------------------

def steer_hidden(h: np.ndarray, add: np.ndarray | None = None, ablate: np.ndarray | None = None) -> np.ndarray:
    """y = h − (h·Aᵀ)·A + add, as `ai.edgeact.Steer` (used for torch-side steering and tests)."""
    y = np.asarray(h, dtype=np.float32)
    if ablate is not None:
        y = y - (y @ ablate.T) @ ablate
    if add is not None:
        y = y + add
    return y


# --- computing vectors from contrastive prompts ------------------------------------------------

METHODS = ("mean-diff", "pca")
POSITIONS = ("last", "mean")


def compute_vectors(model, pos_prompts: Sequence, neg_prompts: Sequence, layers=None,
                    method: str = "mean-diff", position: str = "last", chat: bool = False,
                    progress: bool | None = None) -> dict[int, np.ndarray]:
    """Steering vectors {layer: [hidden]} from the hidden states of positive vs negative prompts.

    `model`: a loaded edgeact Model (its engine's hidden states), a SourceModel, a model folder or a
    source checkpoint path (then the fp32 transformers reference). Prompts are strings (tokenized,
    optionally wrapped in the chat template as a user turn) or lists of token ids.
    `position`: the last token's state, or the mean over the prompt's tokens.
    `progress`: tqdm bars for loading a reference and running the prompts (None: on a terminal).
    `method`: "mean-diff" = mean(pos) − mean(neg); "pca" = first principal component of the paired
    differences pos[i] − neg[i] (uncentered, as representation engineering does with randomly
    ordered pairs), its sign aligned with the mean difference and its length the mean projection of
    the differences on it, so both methods give vectors of comparable scale.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if not pos_prompts or not neg_prompts:
        raise ValueError("need at least one positive and one negative prompt")
    if method == "pca" and len(pos_prompts) != len(neg_prompts):
        raise ValueError(f"pca pairs prompts: got {len(pos_prompts)} positive and {len(neg_prompts)} negative")
    from tqdm import tqdm

    source = hidden_source(model, progress=progress)
    selected = parse_layers(layers, source.num_layers) or list(range(source.num_layers))
    pos_prompts, neg_prompts = list(pos_prompts), list(neg_prompts)
    bar = tqdm(total=len(pos_prompts) + len(neg_prompts), desc="hidden states of the prompts", unit="prompt",
               disable=None if progress is None else not progress)

    def features(prompts):
        rows = []
        for p in prompts:
            hidden = source.hidden(source.encode(p, chat))[selected]  # [layers, S, hidden]
            rows.append(hidden[:, -1] if position == "last" else hidden.mean(axis=1))
            bar.update(1)
        return np.stack(rows, axis=1).astype(np.float64)  # [layers, n, hidden]

    with bar:
        pos, neg = features(pos_prompts), features(neg_prompts)
    out = {}
    for i, layer in enumerate(selected):
        mean_diff = pos[i].mean(0) - neg[i].mean(0)
        if method == "mean-diff":
            vec = mean_diff
        else:
            diffs = pos[i] - neg[i]
            _, _, vt = np.linalg.svd(diffs, full_matrices=False)
            u = vt[0] if vt[0] @ mean_diff >= 0 else -vt[0]
            vec = u * float((diffs @ u).mean())
        out[layer] = vec.astype(np.float32)
    return out


@dataclass
class HiddenSource:
    """What compute_vectors needs from a model: its depth, a tokenizer and per-layer hidden states."""
    num_layers: int
    hidden_size: int
    encode_text: Callable[[str, bool], list[int]] | None
    hidden_fn: Callable[[list[int]], np.ndarray]  # ids → [num_layers, S, hidden], output of each layer
    arch: str = "llama"

    def encode(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.encode_text is None:
                raise ValueError("this model has no tokenizer: give prompts as lists of token ids")
            ids = self.encode_text(prompt, chat)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens")
        return ids

    def hidden(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self.hidden_fn(ids), dtype=np.float32)


def hidden_source(model, progress: bool | None = False) -> HiddenSource:
    """A HiddenSource for an edgeact Model, a SourceModel, a model folder or a source checkpoint path
    (`progress`: a bar while a checkpoint's fp32 reference loads; None: on a terminal)."""
    from edgeact.converters.model import SourceModel

    if isinstance(model, HiddenSource):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            raise ValueError(f"model not found: {path}")
        if (path / "edgeact.json").is_file():
            import edgeact

            return _engine_source(edgeact.load(path))
        from edgeact.converters.readers import read_source

        return torch_source(read_source(path), progress=progress)
    if isinstance(model, SourceModel):
        return torch_source(model, progress=progress)
    if hasattr(model, "engine") and hasattr(model, "config"):
        return _engine_source(model)
    raise ValueError(f"cannot compute hidden states of {type(model).__name__}: "
                     "give an edgeact Model, a SourceModel, a model folder or a checkpoint path")


def torch_source(src, progress: bool | None = False) -> HiddenSource:
    """Hidden states from the fp32 transformers reference of a SourceModel.

    Forward hooks on the decoder blocks capture each block's output directly: HF's
    `hidden_states[i + 1]` is block i's output except the last entry, which has the final
    norm applied.
    """
    import torch

    from edgeact.converters.torch_ref import build_torch_model

    model = build_torch_model(src, progress=progress)
    cfg = src.config

    def hidden_fn(ids):
        captured = []
        hooks = [block.register_forward_hook(
            lambda mod, args, out: captured.append((out[0] if isinstance(out, tuple) else out)[0]))
            for block in model.model.layers]
        try:
            with torch.no_grad():
                model(torch.tensor([ids], dtype=torch.long))
        finally:
            for h in hooks:
                h.remove()
        return torch.stack(captured).numpy()

    encode = None
    if src.tokenizer_json:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(src.tokenizer_json)

        def encode(text, chat):
            if chat:
                if not src.chat_template:
                    raise ValueError("this model has no chat template (chat=False feeds the prompts as they are)")
                text = render_chat(src.chat_template, text, tok, cfg)
                return tok.encode(text, add_special_tokens=False).ids
            ids = tok.encode(text, add_special_tokens=False).ids
            if src.add_bos_token and cfg.bos_token_id is not None:
                ids = [cfg.bos_token_id] + ids
            return ids

    return HiddenSource(cfg.num_layers, cfg.hidden_size, encode, hidden_fn, cfg.arch)


def render_chat(template: str, user_text: str, tokenizer, cfg) -> str:
    """One user turn through a Hugging Face chat template, ready for the assistant's answer."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def token(i):
        return tokenizer.id_to_token(i) if i is not None else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
        bos_token=token(cfg.bos_token_id), eos_token=token((cfg.eos_token_ids or [None])[0]))


def _engine_source(model) -> HiddenSource:
    cfg = model.config

    def hidden_fn(ids):
        model.engine.reset()  # forward continues the KV cache; each prompt starts fresh
        _, hidden = model.engine.forward(np.asarray(ids, dtype=np.int64), output_hidden=True)
        return hidden

    return HiddenSource(cfg.num_layers, cfg.hidden_size, _model_encoder(model), hidden_fn, cfg.arch)


# --- measuring a vector's effect -----------------------------------------------------------------

def word_logprob_shift(model, prompts: Sequence[str], pos_words: Sequence[str], neg_words: Sequence[str],
                       chat: bool = True) -> float:
    """Mean over prompts of mean log p(positive words) − mean log p(negative words) for the next token.

    Each word counts by its first token (words are tokenized as they would start an answer).
    Runs with whatever steering is active on `model`.
    """
    source = hidden_source(model)
    if source.encode_text is None:
        raise ValueError("word_logprob_shift needs a model with a tokenizer")
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)

    def first_tokens(words):
        firsts = set()
        for w in words:
            ids = [i for i in source.encode_text(w, False) if i != bos]
            if not ids:
                raise ValueError(f"word {w!r} has no tokens")
            firsts.add(ids[0])
        return sorted(firsts)

    pos_ids, neg_ids = first_tokens(pos_words), first_tokens(neg_words)
    shifts = []
    for p in prompts:
        model.engine.reset()
        logits = model.engine.forward(np.asarray(source.encode(p, chat), dtype=np.int64))
        last = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])[-1]
        logp = last - (last.max() + np.log(np.exp(last - last.max()).sum()))
        shifts.append(logp[pos_ids].mean() - logp[neg_ids].mean())
    return float(np.mean(shifts))


# --- the `run` command's options -------------------------------------------------------------

def add_steering_args(parser) -> None:
    """--steer VEC.gguf[:SCALE] (repeatable), --steer-layers A-B, --ablate VEC.gguf (repeatable), --steer-generated."""
    g = parser.add_argument_group("steering")
    g.add_argument("--steer", action="append", default=[], metavar="VEC.gguf[:SCALE]",
                   help="add a control vector (llama.cpp GGUF) at its layers, times SCALE (default 1); repeatable")
    g.add_argument("--steer-layers", metavar="A-B", default=None,
                   help="only steer these 0-based layers (e.g. 10-20 or 8,12)")
    g.add_argument("--ablate", action="append", default=[], metavar="VEC.gguf",
                   help="project this direction out of the residual stream at its layers; repeatable")
    g.add_argument("--steer-generated", action="store_true",
                   help="steer only generated tokens, not the prompt")


def parse_steer_spec(spec: str) -> tuple[str, float]:
    """"vec.gguf:4.5" → ("vec.gguf", 4.5); a path without a ':SCALE' suffix has scale 1."""
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or Path(spec).exists() or "/" in tail or "\\" in tail:
        return spec, 1.0   # no suffix, or the colon belongs to the path
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(f"--steer {spec}: the scale after ':' must be a number, not {tail!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"--steer {spec}: the scale must be a finite number")
    return path, scale


def apply_steering_args(model, args) -> None:
    """Apply the options `add_steering_args` defined to a loaded Model (raises ValueError on bad input)."""
    apply_to = "generated" if getattr(args, "steer_generated", False) else "all"
    for spec in getattr(args, "steer", None) or []:
        path, scale = parse_steer_spec(spec)
        model.steer(path, scale=scale, layers=args.steer_layers, mode="add", apply_to=apply_to)
    for path in getattr(args, "ablate", None) or []:
        model.steer(path, layers=args.steer_layers, mode="ablate", apply_to=apply_to)


def iter_prompts(path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts from {p}: {e}") from None
    prompts = [l.strip() for l in lines if l.strip()]
    if not prompts:
        raise ValueError(f"{p} has no prompts (one per line)")
    return prompts


def _model_encoder(model):
    """Text → ids through the Model's tokenizer (None when the folder has no tokenizer)."""
    if getattr(model, "tokenizer", None) is None:
        return None

    def encode(text, chat):
        if chat:
            text = model.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            return model.tokenize(text, add_special_tokens=False)
        return model.tokenize(text)

    return encode
