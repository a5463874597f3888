"""`Dense` and `EinsumDense` whose LoRA runs on the activations and survives saving unmerged."""

import keras
from keras import ops


class LowRankAdaptationMixin:
    """What keras_openpi adds to Keras' LoRA (`enable_lora`) on a `Dense` / `EinsumDense`.

    - The adapters are applied to the activations, `x @ W + scale * (x @ A) @ B`
      (openpi's `lora.Einsum`), not through Keras' merged kernel
      `W + scale * A @ B`: the same outputs and gradients without a full-size
      copy of each frozen matrix per call, nor a full-size kernel gradient
      projected onto A and B. Int8 layers (Keras computes their LoRA on the
      activations already) and einsum equations whose kernel's last axis is
      not the output's last axis keep Keras' call; so does a layer whose
      `low_rank_call` is set to False (for measuring the difference).
    - Saving writes every weight as it is, keyed by name (the frozen base
      kernel, float or int8 with its scale, A and B): Keras 3.15 writes the
      merged kernel and zeroes A and B on load, so a reloaded LoRA layer would
      lose its adapters for good (see `reference/keras.md`).
    - `merge_lora()` folds the adapters into the kernel (int8 kernels are
      dequantized, merged and requantized by Keras) and removes them.
    - `quantize` works on the subclass as on Keras' own layer.

    Without LoRA the layer is Keras' own, weights and files alike.
    """

    keras_layer_class = None  # the Keras layer this one extends
    low_rank_call = True

    def _weight(self, name):
        return next(v for v in self.weights if v.name == name)

    def _low_rank_multiply(self):
        """The product `f(x, kernel)` of the layer, or None where the low-rank call does not apply."""
        if isinstance(self, keras.layers.EinsumDense):
            equation = self.equation
            kernel_axes, output_axes = equation.split(",")[1].split("->")
            if kernel_axes[-1] != output_axes[-1]:
                return None
            return lambda x, kernel: ops.einsum(equation, x, kernel)
        return ops.matmul

    def call(self, inputs, training=None):
        multiply = self._low_rank_multiply() if self.lora_enabled and self.low_rank_call else None
        if multiply is None:
            return super().call(inputs, training=training)

        def product(x, kernel):
            # A bfloat16 frozen kernel meets float32 activations: PyTorch does not promote.
            return multiply(x, ops.cast(kernel, x.dtype))

        x = product(inputs, self._weight("kernel"))
        update = ops.matmul(product(inputs, self.lora_kernel_a), self.lora_kernel_b)
        x = ops.add(x, ops.cast(update * (self.lora_alpha / self.lora_rank), x.dtype))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def save_own_variables(self, store):
        if not self.lora_enabled:
            return super().save_own_variables(store)
        for variable in self.weights:
            store[variable.name] = variable

    def load_own_variables(self, store):
        if not self.lora_enabled:
            return super().load_own_variables(store)
        weights = {variable.name: variable for variable in self.weights}
        found = sorted(store.keys())
        if found != sorted(weights):
            raise ValueError(
                f"Cannot load the LoRA layer {self.path!r}: the file holds the weights "
                f"{found}, the layer has {sorted(weights)}. Files saved by Keras' own LoRA "
                "(adapters merged into the kernel) load into a model without adapters; "
                "call `enable_lora` after loading them."
            )
        for name, variable in weights.items():
            value = store[name]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{variable.path!r} has shape {tuple(variable.shape)}, the file "
                    f"holds {tuple(value.shape)}."
                )
            variable.assign(value)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras' own quantization: the subclass adds nothing to quantize.
        return super().quantize(mode, type_check=False, config=config)

    def merge_lora(self):
        """Folds `alpha / rank * A @ B` into the kernel and removes the adapters.

        Uses Keras' own merge (the kernel `save_own_variables` of Keras' layer
        writes): float kernels are merged in float32 and stored in their dtype;
        int8 kernels are dequantized, merged and requantized. The merged kernel
        keeps its frozen flag.
        """
        if not self.lora_enabled:
            return
        store = {}
        self.keras_layer_class.save_own_variables(self, store)
        self.keras_layer_class.load_own_variables(self, store)  # merged kernel; A and B zeroed
        del self.lora_kernel_a
        del self.lora_kernel_b
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None


@keras.saving.register_keras_serializable(package="keras_openpi")
class LoRADense(LowRankAdaptationMixin, keras.layers.Dense):
    """`keras.layers.Dense` with keras_openpi's LoRA (see `LowRankAdaptationMixin`).

    Example:
    >>> layer = LoRADense(8)
    >>> layer.build((None, 4))
    >>> layer.enable_lora(2)
    >>> layer(keras.ops.ones((3, 4))).shape
    (3, 8)
    """

    keras_layer_class = keras.layers.Dense


@keras.saving.register_keras_serializable(package="keras_openpi")
class LoRAEinsumDense(LowRankAdaptationMixin, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with keras_openpi's LoRA (see `LowRankAdaptationMixin`).

    Example:
    >>> layer = LoRAEinsumDense("btd,ndh->btnh", (None, 2, 4))
    >>> layer.build((None, None, 8))
    >>> layer.enable_lora(2)
    >>> layer(keras.ops.ones((1, 3, 8))).shape
    (1, 3, 2, 4)
    """

    keras_layer_class = keras.layers.EinsumDense
