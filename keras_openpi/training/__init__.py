"""Training: openpi's optimizer and EMA, exactly resumable checkpoints, distribution, configs."""

from keras_openpi.training.callbacks import CheckpointSaver
from keras_openpi.training.callbacks import MetricsLogger
from keras_openpi.training.callbacks import NonFiniteGuard
from keras_openpi.training.callbacks import read_metrics
from keras_openpi.training.checkpoints import CheckpointManager
from keras_openpi.training.checkpoints import load_checkpoint_model
from keras_openpi.training.config import CONFIGS
from keras_openpi.training.config import DataConfig
from keras_openpi.training.config import OptimizerConfig
from keras_openpi.training.config import TrainConfig
from keras_openpi.training.config import apply_overrides
from keras_openpi.training.config import get_config
from keras_openpi.training.distribution import fsdp_layout_map
from keras_openpi.training.errors import CheckpointWriteError
from keras_openpi.training.errors import NonFiniteError
from keras_openpi.training.errors import TrainingStopped
from keras_openpi.training.export import export_checkpoint
from keras_openpi.training.export import export_policy
from keras_openpi.training.distribution import make_distribution
from keras_openpi.training.optimizer import AdamW
from keras_openpi.training.optimizer import WarmupCosineDecay
from keras_openpi.training.trainer import Trainer
from keras_openpi.training.trainer import train

__all__ = [
    "AdamW",
    "CONFIGS",
    "CheckpointManager",
    "CheckpointSaver",
    "CheckpointWriteError",
    "DataConfig",
    "MetricsLogger",
    "NonFiniteError",
    "NonFiniteGuard",
    "OptimizerConfig",
    "TrainConfig",
    "TrainingStopped",
    "Trainer",
    "WarmupCosineDecay",
    "apply_overrides",
    "export_checkpoint",
    "export_policy",
    "fsdp_layout_map",
    "get_config",
    "load_checkpoint_model",
    "make_distribution",
    "read_metrics",
    "train",
]
