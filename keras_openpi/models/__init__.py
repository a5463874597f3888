from keras_openpi.models.pi0 import Pi0
from keras_openpi.models.pi0_fast import Pi0Fast
from keras_openpi.models.variants import GEMMA_VARIANTS
from keras_openpi.models.variants import SIGLIP_SIZES

__all__ = ["Pi0", "Pi0Fast", "GEMMA_VARIANTS", "SIGLIP_SIZES"]
