from keras_openpi.models.paligemma_policy import PaliGemmaPolicy
from keras_openpi.models.pi0 import Pi0
from keras_openpi.models.pi0_fast import Pi0Fast
from keras_openpi.models.presets import SMALL_MODELS
from keras_openpi.models.presets import small_model
from keras_openpi.models.variants import GEMMA_VARIANTS
from keras_openpi.models.variants import SIGLIP_SIZES

__all__ = [
    "GEMMA_VARIANTS",
    "PaliGemmaPolicy",
    "Pi0",
    "Pi0Fast",
    "SIGLIP_SIZES",
    "SMALL_MODELS",
    "small_model",
]
