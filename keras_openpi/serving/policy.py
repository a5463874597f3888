"""`Policy`: a model with its transforms and norm stats, answering robot observations."""

import logging
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
from keras_openpi.serving.robots import model_type_of
from keras_openpi.serving.robots import robot_transforms

logger = logging.getLogger("keras_openpi.serving")


class NonFiniteActions(RuntimeError):
    """The model produced NaN or inf actions: none are returned (the server sends an error)."""


class Policy:
    """openpi's `Policy`: observation → input transforms → sampler → output transforms.

    `infer` takes one unbatched observation in the robot's format and returns
    `{"actions": (H, robot_action_dim), "policy_timing": {"infer_ms": ...}}`;
    `infer_batch` takes a list and returns (B, H, robot_action_dim) actions.
    Every observation is checked (non-finite numbers, then the model's exact
    layout and value range after the transforms) and a bad one raises a
    `ValueError` naming the key. Actions are never returned non-finite: the
    model's actions and the output transforms' are checked, and any NaN or
    inf raises `NonFiniteActions` instead. The sampler is compiled once, at
    construction (warm-up), for the model's fixed input shapes; `infer_ms` is
    the time of the sampler including the copy of the actions to the host, so
    it measures completed device work. Calls from several threads run one at
    a time.

    Args:
        model: a `Pi0` model.
        transforms: input transforms (callables dict → dict) producing the
            model's layout (see `ModelInputs`); the checks of `ModelInputs`
            always run last.
        output_transforms: callables applied to `{"state", "actions"}` of
            each observation (unbatched), e.g. `Unnormalize` and robot outputs.
        num_steps: Euler steps of the flow-matching sampler.
        seed: seed of the starting-noise generator.
        fixed_noise: start every call from the same noise (drawn once from
            `seed`), making actions a deterministic function of the
            observation (for debugging and regression checks).
        metadata: the dict a server sends to each client on connect.
        warmup: compile the sampler now (its time is in `warmup_seconds`).

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
        num_steps=10,
        seed=None,
        fixed_noise=False,
        metadata=None,
        warmup=True,
    ):
        if int(num_steps) < 1:
            raise ValueError(f"'num_steps' must be at least 1, got {num_steps}.")
        self.model = model
        self.num_steps = int(num_steps)
        self._input_transform = compose(transforms)
        self._model_inputs = ModelInputs.for_model(model)
        self._output_transform = compose(output_transforms)
        self._metadata = dict(metadata or {})
        self._rng = np.random.default_rng(seed)
        self._noise_shape = (model.action_horizon, model.action_dim)
        self._fixed_noise = self._draw_noise(1)[0] if fixed_noise else None
        self._lock = threading.Lock()
        self.warmup_seconds = self.warmup() if warmup else None

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
            path: a `.keras` file.
            robot: `aloha`, `droid`, `libero` or `raw` (the model's own layout).
            norm_stats: a `norm_stats.json` path or `{key: NormStats}`; by
                default the file next to the checkpoint (or in its `assets/`),
                else no normalization.
            default_prompt: the prompt of observations that carry none.
            tokenizer: `"byte"`, a SentencePiece `.model` path, a tokenizer
                object, or None (see `resolve_tokenizer`).
            delta_actions: the model predicts actions relative to the state
                (openpi's `pi0_aloha`).
            discrete_state_input: π0.5's state-in-prompt; defaults to True for π0.5.
            **kwargs: `Policy` arguments (`num_steps`, `seed`, `fixed_noise`, `warmup`).

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
            model_type_of(model),
            f"{model.count_params():,}",
            robot,
            source,
            type(getattr(tokenizer, "tokenizer", tokenizer)).__name__,
        )
        metadata = {
            "robot": robot,
            "model_type": model_type_of(model),
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
            noise: optional (H, action_dim) starting noise.

        Returns:
            `{"actions": (H, robot_action_dim), "policy_timing": {"infer_ms": float}}`
            (plus whatever else the output transforms keep).
        """
        if noise is not None:
            noise = _check_noise(noise, self._noise_shape, "(H, action_dim)")[None]
        return self._infer([obs], noise, batched=False)

    def infer_batch(self, observations, noise=None):
        """Actions for a list of observations, run as one batch.

        Args:
            observations: a non-empty list of observation dicts.
            noise: optional (B, H, action_dim) starting noise.

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
            noise = _check_noise(noise, shape, "(B, H, action_dim)")
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
            self._sample(batch, np.zeros((batch_size, *self._noise_shape), np.float32))
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
        return self._rng.standard_normal((batch_size, *self._noise_shape), dtype=np.float32)

    def _sample(self, batch, noise):
        actions = self.model.sample_actions(batch, noise=noise, num_steps=self.num_steps)
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
