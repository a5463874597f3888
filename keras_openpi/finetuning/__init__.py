"""Fine-tuning strategies: LoRA, freezing, memory levers, trainable summary, adapter files."""

from keras_openpi.finetuning.mixin import FinetuningMixin
from keras_openpi.finetuning.strategies import STRATEGIES
from keras_openpi.finetuning.strategies import apply_strategy
from keras_openpi.finetuning.summary import TrainableSummary
from keras_openpi.finetuning.summary import shapes_only

__all__ = [
    "FinetuningMixin",
    "STRATEGIES",
    "TrainableSummary",
    "apply_strategy",
    "shapes_only",
]
