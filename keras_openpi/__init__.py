"""keras_openpi: openpi's π0 / π0.5 / π0-FAST policies as Keras 3 models.

JAX is the primary backend: it is selected unless `KERAS_BACKEND` says otherwise.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_openpi.models import Pi0  # noqa: E402
from keras_openpi.models import Pi0Fast  # noqa: E402
from keras_openpi.serving import Policy  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Pi0", "Pi0Fast", "Policy", "__version__"]
