"""Training configurations: `TrainConfig` and the registry mirroring openpi's `training/config.py`.

A config is plain data (frozen dataclasses, JSON-able), so that it can be
printed, stored with each checkpoint and changed from the command line:

    config = get_config("pi0_libero")
    config = apply_overrides(config, ["data.path=/data/libero", "batch_size=16"])

Nothing is downloaded: configs that start from openpi's released weights
(`pi0_base`, `pi05_base`, `pi0_fast_base`), the PaliGemma tokenizer and
π0-FAST's FAST tokenizer name local paths (`weights=...`, `tokenizer=...`,
`fast_tokenizer=...`).
"""

import ast
import dataclasses
import difflib
import json
import math
import pathlib
import typing

from keras_openpi.models.presets import DEMO_GEMMA
from keras_openpi.models.presets import DEMO_MODEL

# openpi's model types: π0 and π0.5 are `Pi0`, π0-FAST is `Pi0Fast`.
MODEL_TYPES = ("pi0", "pi05", "pi0_fast")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """openpi's `AdamW` and `CosineDecaySchedule` settings (its defaults).

    Args:
        warmup_steps, peak_lr, decay_steps, decay_lr: the warm-up + cosine
            schedule (`WarmupCosineDecay`).
        b1, b2, eps: Adam's betas and epsilon.
        weight_decay: decoupled weight decay.
        clip_gradient_norm: global-norm clipping of the gradients.
    """

    warmup_steps: int = 1_000
    peak_lr: float = 2.5e-5
    decay_steps: int = 30_000
    decay_lr: float = 2.5e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_gradient_norm: float = 1.0

    def __post_init__(self):
        for key, low, high, low_open in (
            ("peak_lr", 0.0, math.inf, True),
            ("decay_lr", 0.0, math.inf, False),
            ("b1", 0.0, 1.0, False),
            ("b2", 0.0, 1.0, False),
            ("eps", 0.0, math.inf, True),
            ("weight_decay", 0.0, math.inf, False),
            ("clip_gradient_norm", 0.0, math.inf, True),
        ):
            value = getattr(self, key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
            if not ok or value >= high and math.isfinite(high):
                bound = f"{'above' if low_open else 'at least'} {low:g}"
                bound += f" and below {high:g}" if math.isfinite(high) else ""
                raise ValueError(f"optimizer.{key} must be a finite number {bound}, got {value!r}.")
        for key in ("warmup_steps", "decay_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"optimizer.{key} must be an int of at least 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training samples come from and how they become model inputs.

    The transforms are openpi's, in its order: repack (dataset keys → the
    robot's) → robot inputs (with delta actions) → normalize → model inputs.

    Args:
        source: `lerobot` (a LeRobot dataset directory), `rlds` (a TFDS/RLDS
            builder directory) or `procedural` (the demo's generated task).
        path: the dataset directory (lerobot, rlds).
        robot: `aloha`, `droid`, `libero` or `raw` (`keras_openpi.data.robots`).
        repack: `{robot key: dataset key path}` (nested dicts allowed); None
            takes the robot's `LEROBOT_REPACK` for LeRobot data, `{}` none.
        action_keys: the dataset features chunked into action sequences
            (openpi's `action_sequence_keys`).
        delta_actions: train on joint actions relative to the state (the
            robot's delta mask; openpi's ALOHA and LIBERO `extra_delta_transform`).
        adapt_to_pi: ALOHA only: convert to π's joint and gripper space.
        prompt_from_task: the prompt is the LeRobot task of each frame.
        default_prompt: the prompt of samples without one.
        asset_id: name of the norm stats directory (`<assets_dir>/<asset_id>`);
            default the dataset directory's name.
        norm_stats: a `norm_stats.json` to use instead of the assets'.
        norm_stats_max_frames: compute the stats on a random subset of this many frames.
        source_options: more reader options (RLDS `keys` / `prompt`,
            procedural `num_episodes` / `image_size`, LeRobot `episodes`).
    """

    source: str = "lerobot"
    path: str | None = None
    robot: str = "raw"
    repack: dict | None = None
    action_keys: tuple = ("action",)
    delta_actions: bool = False
    adapt_to_pi: bool = True
    prompt_from_task: bool = False
    default_prompt: str | None = None
    asset_id: str | None = None
    norm_stats: str | None = None
    norm_stats_max_frames: int | None = None
    source_options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run, from weights and data to checkpoints (openpi's `TrainConfig`).

    Args:
        name: the config's name in the registry.
        description: one line for `keras-openpi train --list`.
        model_type: openpi's model type: `pi0`, `pi05` (both `Pi0`) or
            `pi0_fast` (`Pi0Fast`).
        model: the model's arguments (`action_dim`, `action_horizon`,
            `max_token_len`, `dtype`, variants, `image_keys`, ...; `pi05` is
            set by `model_type`). With `weights` from openpi the architecture
            comes from the checkpoint and these arguments set the rest.
        weights: the weights to start from: an openpi checkpoint's `params`
            directory or `.npz` (e.g. `pi0_base/params`), or a `.keras` file;
            None starts from a random initialization.
        base_weights: what `weights` should be, for messages (e.g. "openpi's pi0_base");
            non-empty makes `weights` required.
        tokenizer: the PaliGemma SentencePiece `.model` file, or `byte` (the
            demo's byte tokenizer; `model.vocabulary_size` 259; not for π0-FAST).
        fast_tokenizer: π0-FAST: the FAST action tokenizer's directory (a
            local copy of `physical-intelligence/fast`, or one written by
            `FASTTokenizer.save`); the trained model carries both tokenizers.
        strategy: a fine-tuning strategy name (`full`, `lora`, ...) or a dict
            `{"name": ..., **options}` (`keras_openpi.finetuning.apply_strategy`).
        augment: openpi's training-time image augmentation.
        discrete_state_input: π0.5's state in the prompt (None: the model type's default).
        data: the `DataConfig`.
        optimizer: the `OptimizerConfig`.
        ema_decay: EMA of the trainable weights (None: off; openpi turns it off for LoRA).
        seed: seeds the initialization, the noise, and the data order.
        batch_size: the global batch size.
        num_train_steps: optimizer steps of the run.
        save_interval: save a checkpoint every this many steps (and at the end).
        keep_last: keep this many most recent checkpoints ...
        keep_period: ... and every checkpoint whose step is a multiple of this (None: none).
        fsdp_devices: shard large weights (and their optimizer state) over
            this many devices; 1 is plain data parallelism.
        num_workers: data-loader threads (None: up to 8, one per core).
        assets_dir: where norm stats live: `<assets_dir>/<name>/<asset_id>/norm_stats.json`.
        checkpoint_base_dir: checkpoints go to `<checkpoint_base_dir>/<name>/<exp_name>`.
        exp_name: the run's name.
        tensorboard: write TensorBoard event files next to the checkpoints.
        on_nonfinite: what a step with a NaN or infinite loss or gradient norm
            does: `stop` the run (a non-zero exit naming the step; the last
            good checkpoint is kept, nothing later is saved) or `skip` its
            update (weights, Adam moments and EMA unchanged, the step
            counted; JAX only).

    Example:
    >>> config = TrainConfig("my_robot", model={"action_horizon": 10}, weights="/ckpt/pi0_base/params",
    ...                      tokenizer="/ckpt/paligemma_tokenizer.model",
    ...                      data=DataConfig(path="/data/my_robot", robot="aloha"))
    >>> config.checkpoint_dir.as_posix()
    'checkpoints/my_robot/default'
    """

    name: str
    description: str = ""
    model_type: str = "pi0"
    model: dict = dataclasses.field(default_factory=dict)
    weights: str | None = None
    base_weights: str = ""
    tokenizer: str | None = None
    fast_tokenizer: str | None = None
    strategy: typing.Any = "full"
    augment: bool = True
    discrete_state_input: bool | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ema_decay: float | None = 0.99
    seed: int = 42
    batch_size: int = 32
    num_train_steps: int = 30_000
    save_interval: int = 1_000
    keep_last: int = 1
    keep_period: int | None = 5_000
    fsdp_devices: int = 1
    num_workers: int | None = None
    assets_dir: str = "./assets"
    checkpoint_base_dir: str = "./checkpoints"
    exp_name: str = "default"
    tensorboard: bool = True
    on_nonfinite: str = "stop"

    def __post_init__(self):
        for key in ("batch_size", "num_train_steps", "save_interval", "keep_last", "fsdp_devices"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}.")
        if self.keep_period is not None and (
            not isinstance(self.keep_period, int) or self.keep_period < 1
        ):
            raise ValueError(
                f"keep_period must be a positive int or None, got {self.keep_period!r}."
            )
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay!r}.")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}."
            )
        if "pi05" in self.model and (
            self.model_type == "pi0_fast" or bool(self.model["pi05"]) != (self.model_type == "pi05")
        ):
            raise ValueError(
                f"model.pi05={self.model['pi05']!r} contradicts model_type {self.model_type!r}: "
                "set model_type=pi05 (or pi0) instead."
            )
        if self.fast_tokenizer is not None and self.model_type != "pi0_fast":
            raise ValueError(
                f"fast_tokenizer is π0-FAST's action tokenizer; model_type is {self.model_type!r}."
            )
        if self.discrete_state_input is not None and self.model_type == "pi0_fast":
            raise ValueError(
                "discrete_state_input is a π0.5 option (π0-FAST always writes the state into its "
                "prompt); model_type is 'pi0_fast'."
            )

    @property
    def checkpoint_dir(self):
        return pathlib.Path(self.checkpoint_base_dir) / self.name / self.exp_name

    @property
    def assets_dirs(self):
        """openpi's `assets_dirs`: `<assets_dir>/<name>`."""
        return pathlib.Path(self.assets_dir) / self.name

    def to_dict(self):
        """The config as JSON-able data (see `config_from_dict`)."""
        return dataclasses.asdict(self)


def upgrade_config_dict(data):
    """`TrainConfig.to_dict()` data of an older version in today's form.

    Older configs had no `model_type`: it was `model.pi05` (now set by `model_type`).
    """
    data = dict(data)
    if "model_type" not in data:
        model = dict(data.get("model") or {})
        data["model_type"] = "pi05" if model.pop("pi05", False) else "pi0"
        data["model"] = model
    return data


def config_from_dict(data):
    """A `TrainConfig` from `TrainConfig.to_dict()` data (e.g. a run's `train_config.json`).

    Data of an older version is read as `upgrade_config_dict` upgrades it.
    """
    data = upgrade_config_dict(data)
    source = dict(data.get("data", {}))
    if "action_keys" in source:
        source["action_keys"] = tuple(source["action_keys"])
    data["data"] = DataConfig(**source)
    data["optimizer"] = OptimizerConfig(**data.get("optimizer", {}))
    return TrainConfig(**data)


# === The registry ===

# openpi: float32 weights, bfloat16 activations.
_PI0 = {"dtype": "mixed_bfloat16"}
# openpi's LoRA configs: LoRA on the model's default targets (π0: both experts, π0-FAST: its
# Gemma), frozen weights stored in bf16, EMA off.
_LORA = {"name": "lora", "frozen_dtype": "bfloat16", "remat": True}
_LIBERO = DataConfig(
    source="lerobot",
    robot="libero",
    action_keys=("actions",),
    prompt_from_task=True,
    delta_actions=True,
    asset_id="physical-intelligence/libero",
)

# openpi's DROID configs read `SimpleDataConfig` data; here DROID in LeRobot format.
_DROID = DataConfig(
    source="lerobot",
    robot="droid",
    action_keys=("actions",),
    prompt_from_task=True,
    asset_id="droid",
)
# π0 / π0.5's cameras; π0-FAST takes the cameras the robot gives (on LIBERO these), openpi
# feeding them in sorted order, while its default (DROID's) is base_0, base_1, wrist_0.
_PI0_IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
_PI0_FAST_LIBERO = dict(
    _PI0, action_dim=7, action_horizon=10, max_token_len=180, image_keys=list(_PI0_IMAGE_KEYS)
)
_ALOHA_SIM = DataConfig(
    source="lerobot",
    robot="aloha",
    default_prompt="Transfer cube",
    asset_id="lerobot/aloha_sim_transfer_cube_human",
)
# A π0 small enough to learn ALOHA transfer-cube on a CPU: one camera (top) at 96x96 in
# 8x8 patches (the cube is a few pixels wide), 14-dim state and actions, byte prompts.
_ALOHA_SIM_SMALL_GEMMA = dict(
    width=64, depth=3, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=16
)
ALOHA_SIM_SMALL_MODEL = dict(
    paligemma_variant=_ALOHA_SIM_SMALL_GEMMA,
    action_expert_variant=_ALOHA_SIM_SMALL_GEMMA,
    vision_variant=dict(width=64, depth=3, mlp_dim=256, num_heads=4, patch_size=8),
    vocabulary_size=259,
    action_dim=14,
    action_horizon=50,
    max_token_len=16,
    image_resolution=[96, 96],
    image_keys=["base_0_rgb"],
)

# The small π0 of the demo, trained on the generated reach task.
_DEMO = TrainConfig(
    name="demo",
    description="a small π0 on the generated reach task: trains on a CPU in a minute",
    model={
        **DEMO_MODEL,
        "image_resolution": list(DEMO_MODEL["image_resolution"]),
        "vocabulary_size": 259,
    },
    tokenizer="byte",
    augment=False,
    data=DataConfig(
        source="procedural",
        robot="raw",
        asset_id="procedural_reach",
        source_options={"num_episodes": 64, "image_size": 96},
    ),
    optimizer=OptimizerConfig(warmup_steps=6, peak_lr=3e-3, decay_steps=60, decay_lr=3e-4),
    ema_decay=None,
    seed=0,
    batch_size=16,
    num_train_steps=60,
    save_interval=20,
    keep_last=2,
    keep_period=None,
)

_CONFIGS = [
    TrainConfig(
        name="pi0_aloha_sim",
        description="π0 on LeRobot's simulated ALOHA cube transfer (absolute joint actions)",
        model=dict(_PI0),
        base_weights="openpi's pi0_base params",
        strategy={"name": "full", "remat": True},
        data=_ALOHA_SIM,
        num_train_steps=20_000,
    ),
    TrainConfig(
        name="pi0_aloha_sim_lora",
        description="π0 LoRA on simulated ALOHA cube transfer on one GPU (frozen weights in bf16)",
        model=dict(_PI0),
        base_weights="openpi's pi0_base params",
        strategy=_LORA,
        data=_ALOHA_SIM,
        ema_decay=None,
        num_train_steps=20_000,
    ),
    TrainConfig(
        name="pi0_aloha_sim_small",
        description="a small π0 from scratch on examples/aloha_sim's demonstrations, on a CPU",
        model=ALOHA_SIM_SMALL_MODEL,
        tokenizer="byte",
        augment=False,
        # examples/aloha_sim's scripted demonstrations (`--set data.path=DIR`).
        data=dataclasses.replace(
            _ALOHA_SIM, asset_id="aloha_sim_scripted", norm_stats_max_frames=4_000
        ),
        optimizer=OptimizerConfig(warmup_steps=100, peak_lr=1e-3, decay_steps=1_500, decay_lr=1e-4),
        ema_decay=None,
        seed=0,
        batch_size=32,
        num_train_steps=1_500,
        save_interval=500,
        keep_period=None,
    ),
    TrainConfig(
        name="pi0_libero",
        description="π0 full fine-tuning on LIBERO (joint deltas, prompts from the tasks)",
        model=dict(_PI0),
        base_weights="openpi's pi0_base params",
        strategy={"name": "full", "remat": True},
        data=_LIBERO,
        num_train_steps=30_000,
    ),
    TrainConfig(
        name="pi0_libero_lora",
        description="π0 LoRA on LIBERO on one GPU (openpi's pi0_libero_low_mem_finetune)",
        model=dict(_PI0),
        base_weights="openpi's pi0_base params",
        strategy=_LORA,
        data=_LIBERO,
        ema_decay=None,
        num_train_steps=30_000,
    ),
    TrainConfig(
        name="pi05_libero",
        description="π0.5 on LIBERO (no state in the prompt, batch 256, EMA 0.999)",
        model_type="pi05",
        model=dict(_PI0, action_horizon=10),
        base_weights="openpi's pi05_base params",
        strategy={"name": "full", "remat": True},
        discrete_state_input=False,
        data=dataclasses.replace(_LIBERO, delta_actions=False),
        optimizer=OptimizerConfig(
            warmup_steps=10_000, peak_lr=5e-5, decay_steps=1_000_000, decay_lr=5e-5
        ),
        ema_decay=0.999,
        batch_size=256,
        num_train_steps=30_000,
    ),
    TrainConfig(
        name="pi0_droid",
        description="π0 (H=10) on DROID data in LeRobot format (joint velocities, asset droid)",
        model=dict(_PI0, action_horizon=10),
        base_weights="openpi's pi0_droid (or pi0_base) params",
        strategy={"name": "full", "remat": True},
        data=_DROID,
        num_train_steps=20_000,
    ),
    TrainConfig(
        name="pi05_droid",
        description="π0.5 (H=15) on DROID data in LeRobot format (asset droid)",
        model_type="pi05",
        model=dict(_PI0, action_horizon=15),
        base_weights="openpi's pi05_droid (or pi05_base) params",
        strategy={"name": "full", "remat": True},
        data=_DROID,
        num_train_steps=20_000,
    ),
    TrainConfig(
        name="pi0_fast_droid",
        description="π0-FAST (8 dims, H=10) on DROID data in LeRobot format (asset droid)",
        model_type="pi0_fast",
        model=dict(_PI0, action_dim=8, action_horizon=10),
        base_weights="openpi's pi0_fast_droid (or pi0_fast_base) params",
        strategy={"name": "full", "remat": True},
        data=_DROID,
        num_train_steps=20_000,
    ),
    TrainConfig(
        name="pi0_fast_libero",
        description="π0-FAST full fine-tuning on LIBERO (7 dims, H=10, 180 tokens, joint deltas)",
        model_type="pi0_fast",
        model=_PI0_FAST_LIBERO,
        base_weights="openpi's pi0_fast_base params",
        strategy={"name": "full", "remat": True},
        data=_LIBERO,
        num_train_steps=30_000,
    ),
    TrainConfig(
        name="pi0_fast_libero_low_mem_finetune",
        description="π0-FAST LoRA (gemma_2b_lora) on LIBERO on one GPU (frozen weights in bf16)",
        model_type="pi0_fast",
        model=_PI0_FAST_LIBERO,
        base_weights="openpi's pi0_fast_base params",
        strategy=_LORA,
        data=_LIBERO,
        ema_decay=None,
        num_train_steps=30_000,
    ),
    _DEMO,
    dataclasses.replace(
        _DEMO,
        name="pi05_demo",
        description="a small π0.5 on the generated reach task (state in the byte prompt), on a CPU",
        model_type="pi05",
        model={**_DEMO.model, "max_token_len": 80},
    ),
    dataclasses.replace(
        _DEMO,
        name="pi0_fast_demo",
        description=(
            "a small π0-FAST on the generated reach task, on a CPU (needs tokenizer= and "
            "fast_tokenizer=)"
        ),
        model_type="pi0_fast",
        model={
            "paligemma_variant": DEMO_GEMMA,
            "vision_variant": DEMO_MODEL["vision_variant"],
            "action_dim": 3,  # the reach task's (x, y, gripper)
            "action_horizon": DEMO_MODEL["action_horizon"],
            "max_token_len": 96,
            "image_resolution": list(DEMO_MODEL["image_resolution"]),
            "image_keys": list(_PI0_IMAGE_KEYS),
        },
        tokenizer=None,
    ),
]

# === examples/metaworld: MetaWorld (simulated Sawyer), and the freezing-strategy study ===

_METAWORLD = DataConfig(
    source="lerobot",
    robot="metaworld",
    repack={
        "observation/image": "observation.image",
        "observation/state": "observation.state",
        "actions": "action",
        "prompt": "prompt",
    },
    prompt_from_task=True,
    asset_id="metaworld_scripted",
)
# A π0 small enough to learn several MetaWorld tasks from pixels on a CPU: one 64x64 camera in
# 8x8 patches, the 4-dim state and actions, chunks of 10 actions (1/8 s), byte prompts (up to
# 32 bytes, plus the BOS and "\n" tokens).
_METAWORLD_SMALL_GEMMA = dict(
    width=64, depth=3, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=16
)
METAWORLD_SMALL_MODEL = dict(
    paligemma_variant=_METAWORLD_SMALL_GEMMA,
    action_expert_variant=_METAWORLD_SMALL_GEMMA,
    vision_variant=dict(width=64, depth=3, mlp_dim=256, num_heads=4, patch_size=8),
    vocabulary_size=259,
    action_dim=4,
    action_horizon=10,
    max_token_len=34,
    image_resolution=[64, 64],
    image_keys=["base_0_rgb"],
)
_METAWORLD_SMALL = dict(
    model=METAWORLD_SMALL_MODEL,
    tokenizer="byte",
    augment=False,
    ema_decay=None,
    seed=0,
    batch_size=32,
    save_interval=1_000,
    keep_period=None,
    tensorboard=False,
)

_CONFIGS += [
    TrainConfig(
        name="pi0_metaworld_small",
        description="a small π0 from scratch on examples/metaworld's demonstrations, on a CPU",
        # examples/metaworld's scripted demonstrations (`--set data.path=DIR`).
        data=dataclasses.replace(_METAWORLD, norm_stats_max_frames=10_000),
        optimizer=OptimizerConfig(warmup_steps=100, peak_lr=1e-3, decay_steps=3_000, decay_lr=1e-4),
        num_train_steps=3_000,
        **_METAWORLD_SMALL,
    ),
    TrainConfig(
        name="pi0_metaworld_small_finetune",
        description="fine-tunes a pi0_metaworld_small policy on new MetaWorld tasks (a strategy)",
        # `--set weights=BASE/export/policy.keras data.norm_stats=BASE/export` (the base's
        # normalization) `strategy=...`.
        base_weights="a pi0_metaworld_small policy.keras",
        data=_METAWORLD,
        optimizer=OptimizerConfig(warmup_steps=30, peak_lr=1e-3, decay_steps=600, decay_lr=1e-4),
        num_train_steps=600,
        **_METAWORLD_SMALL,
    ),
    TrainConfig(
        name="pi0_metaworld",
        description="π0 full fine-tuning on examples/metaworld's demonstrations (one camera)",
        model=dict(_PI0, action_horizon=10),
        base_weights="openpi's pi0_base params",
        strategy={"name": "full", "remat": True},
        data=_METAWORLD,
        num_train_steps=10_000,
    ),
    TrainConfig(
        name="pi0_metaworld_lora",
        description="π0 LoRA on examples/metaworld's demonstrations on one GPU",
        model=dict(_PI0, action_horizon=10),
        base_weights="openpi's pi0_base params",
        strategy=_LORA,
        data=_METAWORLD,
        ema_decay=None,
        num_train_steps=10_000,
    ),
]
CONFIGS = {config.name: config for config in _CONFIGS}


def get_config(name):
    """The registered config `name`; an unknown name raises a ValueError naming the nearest.

    Example:
    >>> get_config("pi0_libero").num_train_steps
    30000
    """
    if name not in CONFIGS:
        nearest = difflib.get_close_matches(name, CONFIGS, n=1, cutoff=0.0)
        raise ValueError(
            f"unknown config {name!r}; did you mean {nearest[0]!r}? "
            "(`keras-openpi train --list` lists them)"
        )
    return CONFIGS[name]


# === Overrides (`--set key=value`) ===


def parse_value(text):
    """A `--set` value: JSON (`8`, `1e-4`, `true`, `null`, `[32, 32]`, `{"name": "lora"}`),
    a Python literal (`None`, `True`, `(1, 2)`), or else the string itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def _check_type(key, current, value, annotation):
    if value is None:
        if current is None or "None" in str(annotation):
            return value
        raise ValueError(f"--set {key}: None is not allowed here (the value is {current!r}).")
    if isinstance(current, bool) or annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"--set {key} expects true or false, got {value!r}.")
    if isinstance(current, float) or "float" in str(annotation):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"--set {key} expects a number, got {value!r}.")
    if isinstance(current, int) or "int" in str(annotation):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"--set {key} expects an integer, got {value!r}.")
    if isinstance(current, tuple):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return value


def _set(obj, keys, value, full_key):
    """`obj` (a dataclass or dict) with the setting at path `keys` replaced by `value`."""
    name, rest = keys[0], keys[1:]
    if isinstance(obj, dict):
        return {**obj, name: _set(obj.get(name, {}), rest, value, full_key) if rest else value}
    fields = {f.name: f for f in dataclasses.fields(obj)}
    done = full_key[: len(full_key) - len(".".join(keys))]
    if name not in fields:
        nearest = difflib.get_close_matches(name, fields, n=1, cutoff=0.0)
        raise ValueError(
            f"--set {full_key}: {type(obj).__name__} has no setting {name!r}; "
            f"did you mean '{done}{nearest[0]}'?"
        )
    current = getattr(obj, name)
    if rest and not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
        raise ValueError(f"--set {full_key}: {done}{name} is a value, not a group of settings.")
    if rest:
        new = _set(current, rest, value, full_key)
    else:
        new = _check_type(full_key, current, value, fields[name].type)
    return dataclasses.replace(obj, **{name: new})


def apply_overrides(config, overrides):
    """`config` with `key=value` overrides applied in order (dotted keys reach into groups).

    Args:
        config: a `TrainConfig`.
        overrides: strings like `batch_size=8`, `data.path=/data/libero`,
            `optimizer.peak_lr=1e-4`, `model.action_horizon=10`,
            `strategy={"name": "lora", "rank": 8}`.

    Example:
    >>> apply_overrides(get_config("demo"), ["batch_size=4", "data.path=/tmp/x"]).batch_size
    4
    """
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {override!r}.")
        config = _set(config, key.split("."), parse_value(text), key)
    return config
