"""`Policy`: a model with its transforms and norm stats, answering robot observations."""

import logging
import math
import pathlib
import threading
import time
from collections.abc import Mapping

import keras
import numpy as np

from keras_openpi.data.transforms import compose
from keras_openpi.serving.checkpoint import checkpoint_format
from keras_openpi.serving.checkpoint import resolve_norm_stats
from keras_openpi.serving.model_inputs import ModelInputs
from keras_openpi.serving.prompt import resolve_tokenizer
from keras_openpi.serving.request_checks import check_finite
from keras_openpi.serving.robots import robot_transforms
from keras_openpi.tokenizers.fast import FASTDecodeError

logger = logging.getLogger("keras_openpi.serving")

# The options of each model type's `sample_actions` that a policy sets, with their defaults.
SAMPLER_OPTIONS = {
    "pi0": {"num_steps": 10},
    "pi05": {"num_steps": 10},
    "pi0_fast": {"max_decoding_steps": 256, "temperature": 0.0},
}
# The model types whose sampler starts from noise (flow matching).
FLOW_MODEL_TYPES = ("pi0", "pi05")


class NoValidActions(RuntimeError):
    """The model gave no valid actions for an observation: none are returned, an error is."""


class NonFiniteActions(NoValidActions):
    """The model produced NaN or inf actions."""


class UndecodableActions(NoValidActions):
    """π0-FAST generated tokens that hold no valid action chunk (openpi would send zeros)."""


def sampler_options(model_type, **given):
    """The `sample_actions` options of a `model_type`: its defaults, with the `given` ones not None.

    Args:
        model_type: `pi0`, `pi05` or `pi0_fast`.
        **given: `num_steps` (π0 / π0.5: Euler steps), `max_decoding_steps`
            and `temperature` (π0-FAST: tokens to decode at most, 0 for greedy).

    Returns:
        `{option: value}`, e.g. `{"num_steps": 10}`.

    Raises:
        ValueError: an option of another model type, or a value out of range.

    Example:
    >>> sampler_options("pi0_fast", temperature=0.5, num_steps=None)
    {'max_decoding_steps': 256, 'temperature': 0.5}
    """
    if model_type not in SAMPLER_OPTIONS:
        raise ValueError(
            f"unknown model type {model_type!r}; expected one of {list(SAMPLER_OPTIONS)}."
        )
    options = dict(SAMPLER_OPTIONS[model_type])
    for name, value in given.items():
        if value is None:
            continue
        if name not in options:
            owners = [t for t, o in SAMPLER_OPTIONS.items() if name in o]
            raise ValueError(
                f"{name!r} is an option of {' and '.join(owners) or 'no model'}; this is a "
                f"{model_type} model, whose sampler takes {list(options)}."
            )
        if name == "temperature":
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (valid and math.isfinite(value) and value >= 0):
                raise ValueError(f"'temperature' must be a finite number >= 0, got {value!r}.")
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name!r} must be an integer >= 1, got {value!r}.")
        options[name] = int(value) if name != "temperature" else value
    return options


class Policy:
    """openpi's `Policy`: observation → input transforms → sampler → output transforms.

    The same for π0, π0.5 and π0-FAST: the sampler is the model's
    `sample_actions` (π0 / π0.5 integrate the flow from noise; π0-FAST
    generates tokens and decodes them with the FAST tokenizer it carries),
    which gives normalized actions for the output transforms.

    `infer` takes one unbatched observation in the robot's format and returns
    `{"actions": (H, robot_action_dim), "policy_timing": {"infer_ms": ...}}`;
    `infer_batch` takes a list and returns (B, H, robot_action_dim) actions.
    Every observation is checked (non-finite numbers, then the model's exact
    layout and value range after the transforms) and a bad one raises a
    `ValueError` naming the key. No made-up actions are ever returned: any
    NaN or inf in the model's actions or after the output transforms raises
    `NonFiniteActions`, and π0-FAST tokens that hold no valid action chunk
    raise `UndecodableActions` (openpi returns zeros there, which a robot
    would execute as a real command). The sampler is compiled once, at
    construction (warm-up), for the model's fixed input shapes; `infer_ms`
    is the time of the sampler including the copy of the actions to the host
    (and π0-FAST's decoding), so it measures completed device work. Calls
    from several threads run one at a time.

    Args:
        model: a `PaliGemmaPolicy` (`Pi0` for π0 / π0.5, or `Pi0Fast` carrying
            its tokenizer).
        transforms: input transforms (callables dict → dict) producing the
            model's layout (see `ModelInputs`); the checks of `ModelInputs`
            always run last.
        output_transforms: callables applied to `{"state", "actions"}` of
            each observation (unbatched), e.g. `Unnormalize` and robot outputs.
        num_steps: π0 / π0.5: Euler steps of the flow-matching sampler (default 10).
        max_decoding_steps: π0-FAST: the most tokens to decode (default 256).
        temperature: π0-FAST: 0 (default) decodes greedily, above 0 samples.
        seed: π0 / π0.5: seed of the starting-noise generator; π0-FAST:
            re-seeds the model's token sampler (matters with `temperature > 0`).
        fixed_noise: π0 / π0.5: start every call from the same noise (drawn
            once from `seed`), making actions a deterministic function of the
            observation (for debugging and regression checks). π0-FAST's
            greedy decoding is deterministic without it.
        metadata: the dict a server sends to each client on connect.
        warmup: compile the sampler now (its time is in `warmup_seconds`).

    Raises:
        ValueError: an option of another model type, or out of range.

    Example:
    >>> policy = Policy(model, seed=0)  # doctest: +SKIP
    >>> policy.infer(observation)["actions"].shape  # doctest: +SKIP
    (50, 32)
    """

    def __init__(
        self,
        model,
        *,
        transforms=(),
        output_transforms=(),
        num_steps=None,
        max_decoding_steps=None,
        temperature=None,
        seed=None,
        fixed_noise=False,
        metadata=None,
        warmup=True,
    ):
        self.model = model
        self.model_type = model.model_type
        self.sample_options = sampler_options(
            self.model_type,
            num_steps=num_steps,
            max_decoding_steps=max_decoding_steps,
            temperature=temperature,
        )
        self.draws_noise = self.model_type in FLOW_MODEL_TYPES
        if fixed_noise and not self.draws_noise:
            raise ValueError(
                "'fixed_noise' is for π0 / π0.5, whose sampler starts from noise; π0-FAST "
                "decodes tokens (greedy decoding, temperature 0, is deterministic)."
            )
        self._input_transform = compose(transforms)
        self._model_inputs = ModelInputs.for_model(model)
        self._output_transform = compose(output_transforms)
        self._metadata = dict(metadata or {})
        self._rng = np.random.default_rng(seed)
        self._noise_shape = (model.action_horizon, model.action_dim)
        self._fixed_noise = self._draw_noise(1)[0] if fixed_noise else None
        self._lock = threading.Lock()
        self.warmup_seconds = self.warmup() if warmup else None
        if seed is not None and not self.draws_noise:
            model.seed_generator.state.assign(np.array([seed, 0], np.uint32))

    @property
    def num_steps(self):
        """π0 / π0.5: the Euler steps of the sampler (None for π0-FAST)."""
        return self.sample_options.get("num_steps")

    @classmethod
    def from_checkpoint(
        cls,
        path,
        *,
        robot="raw",
        norm_stats=None,
        default_prompt=None,
        tokenizer=None,
        delta_actions=False,
        discrete_state_input=None,
        **kwargs,
    ):
        """Loads a checkpoint (see `keras_openpi.serving.checkpoint`) as a policy for `robot`.

        The norm stats are read before the model, so that a wrong file fails fast.

        Args:
            path: a `.keras` file, or a `keras-openpi train` checkpoint (a run
                directory or one of its steps).
            robot: `aloha`, `droid`, `libero` or `raw` (the model's own layout).
            norm_stats: a `norm_stats.json` path or `{key: NormStats}`; by
                default the file next to the checkpoint (or in its `assets/`),
                else no normalization.
            default_prompt: the prompt of observations that carry none.
            tokenizer: π0 / π0.5: `"byte"`, a SentencePiece `.model` path, a
                tokenizer object, or None; π0-FAST: None (the tokenizer the
                model carries) or, for a model that carries none, a directory
                written by `FASTPromptTokenizer.save` (see `resolve_tokenizer`).
            delta_actions: the model predicts actions relative to the state
                (openpi's `pi0_aloha`).
            discrete_state_input: π0.5's state-in-prompt; defaults to True for π0.5.
            **kwargs: `Policy` arguments (`num_steps`, `max_decoding_steps`,
                `temperature`, `seed`, `fixed_noise`, `warmup`).

        Returns:
            a `Policy` with metadata `{"robot", "model_type", "action_horizon"}`.
        """
        path = pathlib.Path(path)
        source_format = checkpoint_format(path)
        stats, source = resolve_norm_stats(norm_stats, source_format.norm_stats_dirs(path))
        model = source_format.load_model(path)
        tokenizer = resolve_tokenizer(tokenizer, model)
        inputs, outputs = robot_transforms(
            robot,
            model,
            norm_stats=stats,
            tokenizer=tokenizer,
            default_prompt=default_prompt,
            delta_actions=delta_actions,
            discrete_state_input=discrete_state_input,
        )
        logger.info(
            "loaded %s (%s, %s parameters) for robot %r; norm stats: %s; tokenizer: %s",
            path,
            model.model_type,
            f"{model.count_params():,}",
            robot,
            source,
            type(getattr(tokenizer, "tokenizer", tokenizer)).__name__,
        )
        metadata = {
            "robot": robot,
            "model_type": model.model_type,
            "action_horizon": int(model.action_horizon),
        }
        return cls(model, transforms=inputs, output_transforms=outputs, metadata=metadata, **kwargs)

    @property
    def metadata(self):
        """The dict sent to clients on connect."""
        return self._metadata

    def infer(self, obs, noise=None):
        """Actions for one unbatched observation.

        Args:
            obs: the observation dict in the robot's format.
            noise: π0 / π0.5: optional (H, action_dim) starting noise.

        Returns:
            `{"actions": (H, robot_action_dim), "policy_timing": {"infer_ms": float}}`
            (plus whatever else the output transforms keep).

        Raises:
            ValueError: a bad observation (naming the key) or bad noise.
            NoValidActions: the model gave no valid actions (nothing is returned).
        """
        if noise is not None:
            noise = self._check_noise(noise, self._noise_shape, "(H, action_dim)")[None]
        return self._infer([obs], noise, batched=False)

    def infer_batch(self, observations, noise=None):
        """Actions for a list of observations, run as one batch.

        Args:
            observations: a non-empty list of observation dicts.
            noise: π0 / π0.5: optional (B, H, action_dim) starting noise.

        Returns:
            `{"actions": (B, H, robot_action_dim), "policy_timing": {"infer_ms", "batch_size"}}`.
        """
        if isinstance(observations, Mapping) or not isinstance(observations, (list, tuple)):
            kind = type(observations).__name__
            raise ValueError(f"'observations' must be a list of observation dicts, got {kind}.")
        if not observations:
            raise ValueError("'observations' must hold at least one observation.")
        if noise is not None:
            shape = (len(observations), *self._noise_shape)
            noise = self._check_noise(noise, shape, "(B, H, action_dim)")
        outputs = self._infer(list(observations), noise, batched=True)
        outputs["policy_timing"]["batch_size"] = len(observations)
        return outputs

    def warmup(self, batch_size=1):
        """Compiles the sampler for `batch_size` on a blank observation; returns the seconds."""
        height, width = self.model.image_resolution
        blank = {
            "image": {key: np.zeros((height, width, 3), np.uint8) for key in self.model.image_keys},
            "state": np.zeros((self.model.action_dim,), np.float32),
            "tokenized_prompt": np.zeros((self.model.max_token_len,), np.int32),
        }
        batch = _stack([self._model_inputs(blank)] * batch_size)
        start = time.perf_counter()
        with self._lock:
            try:
                self._sample(batch, np.zeros((batch_size, *self._noise_shape), np.float32))
            except UndecodableActions:
                pass  # the blank prompt need not decode; the generator is compiled
        return time.perf_counter() - start

    # === Steps ===

    def _prepare(self, obs):
        if not isinstance(obs, Mapping):
            raise ValueError(
                f"an observation must be a dict of named arrays, got {type(obs).__name__}."
            )
        check_finite(obs)
        return self._model_inputs(self._input_transform(dict(obs)))

    def _draw_noise(self, batch_size):
        if not self.draws_noise:
            return None
        return self._rng.standard_normal((batch_size, *self._noise_shape), dtype=np.float32)

    def _check_noise(self, noise, shape, expected):
        if not self.draws_noise:
            raise ValueError(
                "'noise' is for π0 / π0.5, whose sampler starts from noise; this π0-FAST "
                "policy decodes tokens."
            )
        return _check_noise(noise, shape, expected)

    def _sample(self, batch, noise):
        """The model's normalized actions (B, H, action_dim) as numpy."""
        options = dict(self.sample_options)
        if self.draws_noise:
            options["noise"] = noise
        else:
            options["strict"] = True
        try:
            actions = self.model.sample_actions(batch, **options)
        except FASTDecodeError as error:
            raise UndecodableActions(f"{error} No actions were sent.") from None
        return keras.ops.convert_to_numpy(actions)

    def _infer(self, observations, noise, batched):
        batch = _stack([self._prepare(obs) for obs in observations])
        batch_size = len(observations)
        with self._lock:
            if noise is None and self._fixed_noise is not None:
                noise = np.broadcast_to(self._fixed_noise, (batch_size, *self._noise_shape))
            elif noise is None:
                noise = self._draw_noise(batch_size)
            start = time.perf_counter()
            actions = self._sample(batch, noise)
            infer_ms = (time.perf_counter() - start) * 1000.0
        _check_actions(actions, "the model's actions")
        with np.errstate(over="ignore", invalid="ignore"):
            outputs = [
                self._output_transform({"state": batch["state"][i], "actions": actions[i]})
                for i in range(batch_size)
            ]
        result = _stack(outputs) if batched else dict(outputs[0])
        _check_actions(result.get("actions"), "the actions after the output transforms")
        result["policy_timing"] = {"infer_ms": infer_ms}
        return result


def _check_actions(actions, what):
    actions = np.asarray(actions)
    if actions.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(actions)))
        if bad:
            raise NonFiniteActions(
                f"{what} have {bad} non-finite values of {actions.size} (NaN or inf); "
                "no actions were sent."
            )


def _check_noise(noise, shape, expected):
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape != shape:
        raise ValueError(f"'noise' must have shape {expected} = {shape}, got {noise.shape}.")
    return noise


def _stack(samples):
    return keras.tree.map_structure(lambda *leaves: np.stack(leaves), *samples)
