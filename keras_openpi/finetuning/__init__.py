"""Fine-tuning strategies: LoRA, freezing, memory levers, trainable summary, adapter files."""

from keras_openpi.backend.keras_private import shapes_only
from keras_openpi.finetuning.mixin import FinetuningMixin
from keras_openpi.finetuning.strategies import STRATEGIES
from keras_openpi.finetuning.strategies import apply_strategy
from keras_openpi.finetuning.strategies import available_strategies
from keras_openpi.finetuning.summary import TrainableSummary

__all__ = [
    "FinetuningMixin",
    "STRATEGIES",
    "TrainableSummary",
    "apply_strategy",
    "available_strategies",
    "shapes_only",
]
