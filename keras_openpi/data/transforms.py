"""openpi's data transforms: pure callables on one unbatched numpy sample dict.

A transform maps a sample dict to a new sample dict and never modifies its
input. Samples are nested dicts of numpy arrays (and a `prompt` string), e.g.
`{"image": {"base_0_rgb": (h, w, 3) uint8}, "image_mask": {...}, "state": (s,),
"actions": (H, a), "prompt": "pick up the cup"}`. Nested keys are addressed by
"/"-joined paths (`"image/base_0_rgb"`).

Training applies `repack → robot inputs → Normalize → model inputs`; a policy
applies the same inputs, then `model outputs → Unnormalize → robot outputs`
(see `keras_openpi.data.pipeline`).
"""

import dataclasses
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Callable
from typing import NamedTuple

import numpy as np

from keras_openpi.data.image_tools import resize_with_pad
from keras_openpi.data.normalize import NormStats
from keras_openpi.data.normalize import normalize
from keras_openpi.data.normalize import unnormalize
from keras_openpi.data.normalize import warn_near_zero_range

DataTransform = Callable[[dict], dict]


# === Nested dict helpers ===


def flatten_dict(tree, sep="/"):
    """`{"a": {"b": x}}` → `{"a/b": x}`; leaves are everything that is not a Mapping."""
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            path = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(path, value)
            else:
                flat[path] = value

    visit("", tree)
    return flat


def unflatten_dict(flat, sep="/"):
    """Inverse of `flatten_dict`."""
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split(sep)
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def transform_dict(patterns, tree):
    r"""Renames and removes the leaves of a nested dict by regular expressions (openpi's).

    Each leaf's "/"-joined path is matched against the `patterns` in order;
    the first pattern that matches the *whole* path decides: its value is the
    new path (`re.sub` syntax, so `\1` refers to a group), or None to remove
    the leaf. Leaves that no pattern matches keep their path.

    Args:
        patterns: `{regex over paths: new path or None}`, tried in order.
        tree: a nested dict.

    Returns:
        A new nested dict.

    Raises:
        ValueError: a pattern is not a valid regular expression, two leaves get
            the same path, or a leaf's path is also a node of another leaf.

    Example:
    >>> transform_dict({"(.+)/c": r"\1/d", "b": None}, {"a": {"c": 1}, "b": 2, "e": 3})
    {'a': {'d': 1}, 'e': 3}
    """
    compiled = []
    for pattern, replacement in patterns.items():
        try:
            compiled.append((re.compile(pattern), replacement))
        except re.error as error:
            raise ValueError(
                f"transform_dict: pattern {pattern!r} is not a regular expression: {error}"
            ) from None
    output, sources = {}, {}
    for path, value in flatten_dict(tree).items():
        new_path = path
        for pattern, replacement in compiled:
            if pattern.fullmatch(path):
                new_path = None if replacement is None else pattern.sub(replacement, path, count=1)
                break
        if new_path is None:
            continue
        if new_path in output:
            raise ValueError(
                f"transform_dict: key {new_path!r} already exists in the output "
                f"(from {sources[new_path]!r} and {path!r})."
            )
        output[new_path], sources[new_path] = value, path
    names = sorted(output)
    for name, next_name in zip(names, names[1:]):
        if next_name.startswith(name + "/"):
            raise ValueError(
                f"transform_dict: leaf {name!r} aliases a node of {next_name!r} (a path cannot "
                "be both a value and a dict)."
            )
    return unflatten_dict(output)


def _find_path(tree, path, sep="/"):
    """The keys leading to `path` in `tree` (a key may itself contain `sep`), or None."""
    if path in tree:
        return [path]
    head, _, rest = path.partition(sep)
    if rest and isinstance(tree.get(head), Mapping):
        tail = _find_path(tree[head], rest, sep)
        return None if tail is None else [head, *tail]
    return None


def _replace_path(tree, keys, fn):
    """A copy of `tree` with the leaf at `keys` replaced by `fn(leaf)`."""
    head, *rest = keys
    value = _replace_path(tree[head], rest, fn) if rest else fn(tree[head])
    return {**tree, head: value}


def pad_to_dim(x, dim, axis=-1, value=0.0):
    """Pads `x` with `value` along `axis` up to size `dim` (unchanged if already as wide)."""
    x = np.asarray(x)
    missing = dim - x.shape[axis]
    if missing <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return np.pad(x, widths, constant_values=value)


def make_bool_mask(*dims):
    """Run-length boolean mask: a positive n gives n True, a negative n gives |n| False.

    Example:
    >>> make_bool_mask(6, -1, 6, -1)  # ALOHA: delta joints, absolute grippers
    (True, True, True, True, True, True, False, True, True, True, True, True, True, False)
    """
    mask = []
    for dim in dims:
        mask.extend([dim > 0] * abs(dim))
    return tuple(mask)


# === Composition ===


class Group(NamedTuple):
    """Input transforms and the output transforms that undo them.

    A `Group` is also the pair `(inputs, outputs)`.

    Args:
        inputs: transforms applied, in order, to a sample (or an observation).
        outputs: transforms applied, in order, to the model's outputs.

    Example:
    >>> group = Group(inputs=[InjectDefaultPrompt("wave")])
    >>> compose(group.inputs)({})["prompt"]
    'wave'
    """

    inputs: Sequence[DataTransform] = ()
    outputs: Sequence[DataTransform] = ()

    def push(self, inputs=(), outputs=()):
        """A new group with `inputs` appended after, and `outputs` before, the current ones."""
        return Group((*self.inputs, *inputs), (*outputs, *self.outputs))


@dataclasses.dataclass(frozen=True)
class Compose:
    """Applies `transforms` in order.

    Example:
    >>> Compose([InjectDefaultPrompt("a"), PadStatesAndActions(3)])({"state": np.ones(2)})["state"]
    array([1., 1., 0.])
    """

    transforms: Sequence[DataTransform]

    def __call__(self, data):
        for transform in self.transforms:
            data = transform(data)
        return data


def compose(transforms):
    """One transform that applies `transforms` in order."""
    return Compose(tuple(transforms))


# === Generic transforms ===


@dataclasses.dataclass(frozen=True)
class Repack:
    """Builds a new sample whose leaves are picked from the input by "/"-paths.

    Args:
        structure: a nested dict whose leaves are "/"-joined paths into the input.

    Example:
    >>> repack = Repack({"images": {"cam_high": "observation.images.top"},
    ...                  "state": "observation.state", "actions": "action"})
    >>> sorted(repack({"observation.images.top": 0, "observation.state": 1,
    ...                "action": 2, "episode_index": 3}))
    ['actions', 'images', 'state']
    """

    structure: Mapping

    def __call__(self, data):
        flat = flatten_dict(data)

        # The output keeps the structure's keys as they are (openpi maps its leaves):
        # LIBERO's `"observation/image"` stays one key, as `LiberoInputs` reads it.
        def pick(structure, prefix):
            picked = {}
            for target, source in structure.items():
                if isinstance(source, Mapping):
                    picked[target] = pick(source, f"{prefix}{target}/")
                elif source not in flat:
                    raise ValueError(
                        f"Repack: the sample has no key {source!r} (wanted for "
                        f"{prefix + target!r}); it has {sorted(flat)}."
                    )
                else:
                    picked[target] = flat[source]
            return picked

        return pick(self.structure, "")


@dataclasses.dataclass(frozen=True)
class InjectDefaultPrompt:
    """Sets `prompt` to `prompt` where the sample has none (no-op when `prompt` is None)."""

    prompt: str | None

    def __call__(self, data):
        if self.prompt is None or "prompt" in data:
            return data
        return {**data, "prompt": self.prompt}


@dataclasses.dataclass(frozen=True)
class PromptFromLeRobotTask:
    """Sets `prompt` to the LeRobot task named by the sample's `task_index`.

    Args:
        tasks: `{task_index: task string}` (LeRobot's `meta/tasks`).
    """

    tasks: Mapping[int, str]

    def __call__(self, data):
        if "task_index" not in data:
            raise ValueError(
                f"PromptFromLeRobotTask: the sample has no 'task_index'; it has {sorted(data)}."
            )
        index = int(np.asarray(data["task_index"]))
        if index not in self.tasks:
            raise ValueError(
                f"PromptFromLeRobotTask: task_index {index} is not among the dataset's "
                f"tasks {sorted(self.tasks)}."
            )
        return {**data, "prompt": self.tasks[index]}


def _check_mask(mask, data, name):
    dims = len(mask)
    for key in ("state", "actions"):
        if key not in data:
            raise ValueError(f"{name}: the sample has no {key!r}; it has {sorted(data)}.")
        width = np.shape(data[key])[-1]
        if width < dims:
            raise ValueError(
                f"{name}: the mask covers {dims} dims but {key!r} has only {width} "
                f"(shape {np.shape(data[key])})."
            )
    return np.where(np.asarray(mask), np.asarray(data["state"])[..., :dims], 0.0)


@dataclasses.dataclass(frozen=True)
class DeltaActions:
    """Absolute → delta actions: subtracts the current state on the dims `mask` selects.

    `actions[..., :d] -= where(mask, state[..., :d], 0)` for every step of the
    chunk, `d = len(mask)`; dims past `d` are left as they are. A no-op without
    `actions` (inference) or with `mask=None`.

    Args:
        mask: booleans, e.g. `make_bool_mask(6, -1, 6, -1)`, or None.
    """

    mask: Sequence[bool] | None

    def __call__(self, data):
        if self.mask is None or "actions" not in data:
            return data
        offset = _check_mask(self.mask, data, "DeltaActions")
        actions = np.array(data["actions"], dtype=np.result_type(data["actions"], np.float32))
        actions[..., : len(self.mask)] -= offset[..., None, :]
        return {**data, "actions": actions}


@dataclasses.dataclass(frozen=True)
class AbsoluteActions:
    """Delta → absolute actions: the inverse of `DeltaActions` (adds the state back)."""

    mask: Sequence[bool] | None

    def __call__(self, data):
        if self.mask is None or "actions" not in data:
            return data
        offset = _check_mask(self.mask, data, "AbsoluteActions")
        actions = np.array(data["actions"], dtype=np.result_type(data["actions"], np.float32))
        actions[..., : len(self.mask)] += offset[..., None, :]
        return {**data, "actions": actions}


@dataclasses.dataclass(frozen=True)
class SubsampleActions:
    """Keeps every `stride`-th step of the action chunk: `actions[::stride]` (openpi's).

    A no-op without `actions` (inference).

    Args:
        stride: a positive step.

    Example:
    >>> SubsampleActions(2)({"actions": np.arange(5)[:, None]})["actions"][:, 0]
    array([0, 2, 4])
    """

    stride: int

    def __post_init__(self):
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(
                f"SubsampleActions: 'stride' must be a positive int, got {self.stride!r}."
            )

    def __call__(self, data):
        if "actions" not in data:
            return data
        actions = np.asarray(data["actions"])
        if actions.ndim == 0:
            raise ValueError("SubsampleActions: 'actions' must be a chunk (H, ...), got a scalar.")
        return {**data, "actions": actions[:: self.stride]}


@dataclasses.dataclass(frozen=True)
class PadStatesAndActions:
    """Zero-pads the last axis of `state` and `actions` to the model's `action_dim`."""

    action_dim: int

    def __call__(self, data):
        out = dict(data)
        for key in ("state", "actions"):
            if key not in data:
                if key == "state":
                    raise ValueError(
                        f"PadStatesAndActions: the sample has no 'state'; it has {sorted(data)}."
                    )
                continue
            width = np.shape(data[key])[-1]
            if width > self.action_dim:
                raise ValueError(
                    f"PadStatesAndActions: {key!r} has {width} dims, more than the model's "
                    f"action_dim {self.action_dim} (shape {np.shape(data[key])})."
                )
            out[key] = pad_to_dim(data[key], self.action_dim)
        return out


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    """Resizes every `image/<camera>` to `(height, width)` keeping aspect, zero-padded.

    Uses `image_tools.resize_with_pad` (openpi-client's PIL bilinear resize).
    """

    height: int
    width: int

    def __call__(self, data):
        if "image" not in data:
            raise ValueError(f"ResizeImages: the sample has no 'image'; it has {sorted(data)}.")
        images = {
            key: resize_with_pad(image, self.height, self.width, name=f"image/{key}")
            for key, image in data["image"].items()
        }
        return {**data, "image": images}


@dataclasses.dataclass(frozen=True)
class TokenizePrompt:
    """Replaces `prompt` by `tokenized_prompt` (L,) int32 and `tokenized_prompt_mask` (L,) bool.

    Args:
        tokenizer: has `tokenize(prompt, state=None) -> (ids, mask)`, e.g.
            `keras_openpi.tokenizers.PaliGemmaTokenizer`.
        discrete_state_input: π0.5's format: the (normalized, unpadded) state
            is written into the prompt as 256-bin ids; needs `state`.
    """

    tokenizer: Any
    discrete_state_input: bool = False

    def __call__(self, data):
        if data.get("prompt") is None:
            raise ValueError(
                f"TokenizePrompt: the sample has no 'prompt' (set one with the dataset's "
                f"tasks or a default prompt); it has {sorted(data)}."
            )
        data = dict(data)
        prompt = data.pop("prompt")
        if isinstance(prompt, np.ndarray):
            prompt = prompt.item()
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        if self.discrete_state_input:
            if "state" not in data:
                raise ValueError(
                    "TokenizePrompt: discrete_state_input needs 'state'; "
                    f"the sample has {sorted(data)}."
                )
            ids, mask = self.tokenizer.tokenize(prompt, np.asarray(data["state"]))
        else:
            ids, mask = self.tokenizer.tokenize(prompt)
        data["tokenized_prompt"] = np.asarray(ids, dtype=np.int32)
        data["tokenized_prompt_mask"] = np.asarray(mask, dtype=bool)
        return data


@dataclasses.dataclass(frozen=True)
class TokenizeFASTInputs:
    """π0-FAST's inputs: `prompt`, `state` (and `actions` in training) become tokens.

    Writes `tokenized_prompt`, `tokenized_prompt_mask`, `token_ar_mask` and
    `token_loss_mask` (each (L,)); `state` and `actions` stay in the sample.
    Without `actions` (inference) only the prefix is tokenized.

    Args:
        tokenizer: a `keras_openpi.tokenizers.FASTPromptTokenizer`.
    """

    tokenizer: Any

    def __call__(self, data):
        if data.get("prompt") is None:
            raise ValueError(
                f"TokenizeFASTInputs: the sample has no 'prompt' (set one with the dataset's "
                f"tasks or a default prompt); it has {sorted(data)}."
            )
        if "state" not in data:
            raise ValueError(
                f"TokenizeFASTInputs: π0-FAST writes the state into the prompt; the sample "
                f"has no 'state'; it has {sorted(data)}."
            )
        data = dict(data)
        prompt = data.pop("prompt")
        if isinstance(prompt, np.ndarray):
            prompt = prompt.item()
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        actions = data.get("actions")
        tokens, token_mask, ar_mask, loss_mask = self.tokenizer.tokenize(
            prompt, np.asarray(data["state"]), None if actions is None else np.asarray(actions)
        )
        data["tokenized_prompt"] = np.asarray(tokens, dtype=np.int32)
        data["tokenized_prompt_mask"] = np.asarray(token_mask, dtype=bool)
        data["token_ar_mask"] = np.asarray(ar_mask, dtype=np.int32)
        data["token_loss_mask"] = np.asarray(loss_mask, dtype=bool)
        return data


@dataclasses.dataclass(frozen=True)
class ExtractFASTActions:
    """π0-FAST's outputs: the generated token ids in `actions` become an (H, D) chunk.

    openpi's policy puts the model's output in `actions`; for π0-FAST those
    are token ids, decoded here with the tokenizer's `extract_actions`
    (zeros when the tokens hold no valid chunk). Samples without `actions`
    pass through.

    Args:
        tokenizer: the `FASTPromptTokenizer` of the model.
        action_horizon: H.
        action_dim: D (the model's `action_dim`).
    """

    tokenizer: Any
    action_horizon: int
    action_dim: int

    def __call__(self, data):
        if "actions" not in data:
            return data
        tokens = np.asarray(data["actions"])
        if tokens.ndim != 1:
            raise ValueError(
                f"ExtractFASTActions: 'actions' must hold one sequence of generated token ids "
                f"(T,), got shape {tokens.shape}."
            )
        actions = self.tokenizer.extract_actions(
            tokens.astype(np.int32), self.action_horizon, self.action_dim
        )
        return {**data, "actions": actions}


# === Normalization ===


def _check_stats(norm_stats, use_quantiles):
    for key, stats in norm_stats.items():
        if not isinstance(stats, NormStats):
            raise ValueError(f"norm stats {key!r} must be a NormStats, got {type(stats).__name__}.")
        if use_quantiles and (stats.q01 is None or stats.q99 is None):
            raise ValueError(
                f"quantile normalization needs q01 and q99, but the norm stats of {key!r} "
                "have none (recompute them with `keras-openpi norm-stats`)."
            )


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Normalizes the sample's keys that have stats (openpi's `Normalize`).

    z-score `(x - mean) / (std + 1e-6)`, or with `use_quantiles`
    `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1` (no clipping). Stats wider than
    `x` are truncated to its width (stats describe unpadded data; normalize
    before padding). Keys without stats pass through. Warns once per
    dimension whose range is near zero.

    Args:
        norm_stats: `{"/"-path: NormStats}` (e.g. `state`, `actions`), or None (no-op).
        use_quantiles: quantile instead of z-score (openpi: π0.5 and π0-FAST).
        strict: every stats key must be in the sample (openpi's `strict`).
    """

    norm_stats: Mapping[str, NormStats] | None
    use_quantiles: bool = False
    strict: bool = False

    def __post_init__(self):
        if self.norm_stats is not None:
            _check_stats(self.norm_stats, self.use_quantiles)
            warn_near_zero_range(self.norm_stats, use_quantiles=self.use_quantiles)

    def __call__(self, data):
        if self.norm_stats is None:
            return data
        missing = "is not in the sample {keys} (strict=True)." if self.strict else None
        return _per_stats_key(
            data, self.norm_stats, self.use_quantiles, normalize, "Normalize", missing
        )


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    """Inverse of `Normalize` on the model's outputs (openpi's `Unnormalize`).

    z-score `x * (std + 1e-6) + mean` with stats padded by mean 0 / std 1 to
    the width of `x`; quantile `(x + 1) / 2 * (q99 - q01 + 1e-6) + q01` on the
    first `len(q01)` dims, later dims unchanged.

    Args:
        norm_stats: as for `Normalize`, or None (no-op).
        use_quantiles: quantile instead of z-score.
        strict: every stats key must be in the outputs (openpi; that is why its
            policy keeps the input `state` in the outputs).
    """

    norm_stats: Mapping[str, NormStats] | None
    use_quantiles: bool = False
    strict: bool = True

    def __post_init__(self):
        if self.norm_stats is not None:
            _check_stats(self.norm_stats, self.use_quantiles)

    def __call__(self, data):
        if self.norm_stats is None:
            return data
        missing = (
            "is not in the outputs {keys} (keep the input 'state' in the outputs as openpi's "
            "policy does, or pass strict=False)."
            if self.strict
            else None
        )
        return _per_stats_key(
            data, self.norm_stats, self.use_quantiles, unnormalize, "Unnormalize", missing
        )


def _per_stats_key(data, norm_stats, use_quantiles, function, name, missing):
    """Applies `function(x, stats, use_quantiles, key=key)` to the value at each stats key.

    A key `data` lacks raises `ValueError` when `missing` (a message with `{keys}`, the
    sample's keys) is given, and is skipped when it is None.
    """
    for key, stats in norm_stats.items():
        path = _find_path(data, key)
        if path is not None:
            data = _replace_path(data, path, lambda x: function(x, stats, use_quantiles, key=key))
        elif missing is not None:
            keys = sorted(flatten_dict(data))
            raise ValueError(f"{name}: norm stats key {key!r} " + missing.format(keys=keys))
    return data
