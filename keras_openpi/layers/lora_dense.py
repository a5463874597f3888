"""`Dense` and `EinsumDense` whose LoRA runs on the activations and survives saving unmerged.

Two forms of adapter (`lora_form`):

- `"keras"`: Keras' own `enable_lora`. A has `kernel.shape[:-1] + (rank,)`, B
  `(rank, kernel.shape[-1])` (one B shared by every head of an einsum), A
  He-uniform and B zeros; the update is `alpha / rank * A @ B`.
- `"openpi"`: openpi's `lora.Einsum` / `lora.FeedForward`. A has the kernel's
  shape with its last axis replaced by the rank, B the kernel's shape with
  its second-to-last axis replaced by the rank (a B per head: query (N, r, H),
  key and value (K, r, H), output (N, r, D)); both start N(0, 0.01). An
  einsum's update is `alpha / rank * einsum_b(einsum_a(x, A), B)` with openpi's
  equations (for the output projection, whose heads are contracted, only
  `sum_n B[n]` acts); a `Dense` is openpi's feed-forward matrix, whose update
  `x @ A @ B` is not scaled at all (openpi's `FeedForward` ignores alpha).
"""

import re
import string

import keras
from keras import ops

from keras_openpi.backend.keras_private import replace_variable

LORA_FORMS = ("keras", "openpi")
# openpi's `LoRAConfig.init_fn`: both A and B start from N(0, 0.01).
OPENPI_LORA_STDDEV = 0.01


def check_lora_form(form):
    """Raises a `ValueError` unless `form` is one of `LORA_FORMS`."""
    if form not in LORA_FORMS:
        raise ValueError(f"LoRA form must be one of {LORA_FORMS}, got {form!r}.")
    return form


def openpi_lora_equations(equation):
    """openpi's two LoRA einsums for a kernel einsum, and the one that merges A and B.

    As openpi's `lora.Einsum._make_lora_eqns`: with the kernel's last two axes
    `a` (an input axis) and `b` (an output axis) and a fresh label `L`,
    `eqn_a` maps the inputs onto `L` (A is the kernel with `b` -> `L`) and
    `eqn_b` maps `L` onto the outputs (B is the kernel with `a` -> `L`). B's
    axes that are neither in `eqn_a`'s output nor in the layer's (the heads
    of an output projection) are summed in `eqn_b`.

    Args:
        equation: the layer's equation, e.g. `"btd,ndh->btnh"`.

    Returns:
        `(eqn_a, eqn_b, eqn_merge, summed)`: `einsum(eqn_merge, A, B.sum(summed))`
        is the kernel update that `eqn_a` then `eqn_b` apply.

    Raises:
        ValueError: an equation whose kernel's last two axes are not an input
            and an output axis.
    """
    match = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", equation.replace(" ", ""))
    lhs, rhs, out = match.groups() if match else (None, None, None)
    if not match or len(rhs) < 2 or rhs[-2] not in lhs or rhs[-2] in out or rhs[-1] not in out:
        raise ValueError(
            f"openpi's LoRA form needs an einsum whose kernel's last two axes are an input "
            f"axis and an output axis (e.g. 'btd,ndh->btnh'); got {equation!r}."
        )
    label = next(c for c in string.ascii_letters if c not in equation)
    a_label, b_label = rhs[-2], rhs[-1]
    a_rhs, a_out = rhs.replace(b_label, label), out.replace(b_label, label)
    b_rhs = rhs.replace(a_label, label)
    summed = tuple(i for i, c in enumerate(b_rhs) if c not in a_out and c not in out)
    kept = "".join(c for i, c in enumerate(b_rhs) if i not in summed)
    return f"{lhs},{a_rhs}->{a_out}", f"{a_out},{b_rhs}->{out}", f"{a_rhs},{kept}->{rhs}", summed


class LowRankAdaptationMixin:
    """What keras_openpi adds to Keras' LoRA (`enable_lora`) on a `Dense` / `EinsumDense`.

    - Two adapter forms, Keras' and openpi's (see the module docstring):
      `enable_lora(rank, lora_alpha, form="openpi")`.
    - The adapters are applied to the activations, `x @ W + scale * (x @ A) @ B`
      (openpi's `lora.Einsum`), not through Keras' merged kernel
      `W + scale * A @ B`: the same outputs and gradients without a full-size
      copy of each frozen matrix per call, nor a full-size kernel gradient
      projected onto A and B. Int8 layers (Keras computes their LoRA on the
      activations already) and, in Keras' form, einsum equations whose
      kernel's last axis is not the output's last axis keep Keras' call; so
      does a layer whose `low_rank_call` is set to False (for measuring the
      difference: the `kernel` property is then the merged kernel).
    - Saving writes every weight as it is, keyed by name (the frozen base
      kernel, float or int8 with its scale, A and B): Keras 3.15 writes the
      merged kernel and zeroes A and B on load, so a reloaded LoRA layer would
      lose its adapters for good (see `reference/keras.md`).
    - `merge_lora()` folds the adapters into the kernel (int8 kernels are
      dequantized, merged and requantized by Keras) and removes them.
    - `quantize` works on the subclass as on Keras' own layer (openpi's form
      adapts float kernels only).

    Without LoRA the layer is Keras' own, weights and files alike.

    Args:
        lora_form: the form `enable_lora` uses by default (and the form of the
            `lora_rank` argument's adapters): `"keras"` or `"openpi"`.
        *args, **kwargs: the Keras layer's arguments.
    """

    keras_layer_class = None  # the Keras layer this one extends
    low_rank_call = True
    lora_form = "keras"

    def __init__(self, *args, lora_form="keras", **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_form = check_lora_form(lora_form)

    def _weight(self, name):
        return next(v for v in self.weights if v.name == name)

    def _is_einsum(self):
        return isinstance(self, keras.layers.EinsumDense)

    @property
    def lora_scale(self):
        """The factor of the adapters' product: `alpha / rank`, or 1 for openpi's feed-forward form."""
        if self.lora_form == "openpi" and not self._is_einsum():
            return 1.0
        return self.lora_alpha / self.lora_rank

    def enable_lora(self, rank, lora_alpha=None, a_initializer=None, b_initializer=None, form=None):
        """Adds LoRA adapters A and B and freezes the kernel (Keras' `enable_lora`, in either form).

        Args:
            rank: the adapters' rank r.
            lora_alpha: alpha (default r); the update is scaled by `alpha / r`,
                except in openpi's feed-forward form (a `Dense`), which is not scaled.
            a_initializer, b_initializer: default He-uniform and zeros
                (Keras' form), N(0, 0.01) both (openpi's).
            form: `"keras"` or `"openpi"`; default the layer's `lora_form`.

        Raises:
            ValueError: an unknown form, or openpi's form on a quantized layer
                or an einsum openpi's LoRA does not apply to.
        """
        form = check_lora_form(self.lora_form if form is None else form)
        if form == "keras":
            super().enable_lora(
                rank,
                lora_alpha=lora_alpha,
                a_initializer=a_initializer or "he_uniform",
                b_initializer=b_initializer or "zeros",
            )
            self.lora_form = form
            return
        if self.quantization_mode is not None:
            raise ValueError(
                f"{self.path!r} is quantized ({self.quantization_mode}); openpi's LoRA form "
                "adapts float kernels (use form='keras' with quantized bases)."
            )
        if self._is_einsum():
            openpi_lora_equations(self.equation)  # raises for an equation it does not fit
        openpi_init = keras.initializers.RandomNormal(stddev=OPENPI_LORA_STDDEV)
        a_initializer = a_initializer or openpi_init
        b_initializer = b_initializer or openpi_init
        kernel_shape = tuple(self._weight("kernel").shape)
        b_shape = kernel_shape[:-2] + (rank, kernel_shape[-1])
        per_head = len(b_shape) > 2  # Keras' B is (rank, kernel_shape[-1])
        super().enable_lora(
            rank,
            lora_alpha=lora_alpha,
            a_initializer=a_initializer,
            b_initializer="zeros" if per_head else b_initializer,
        )
        if per_head:
            replace_variable(
                self,
                self.lora_kernel_b,
                lambda: self.add_weight(
                    name="lora_kernel_b",
                    shape=b_shape,
                    initializer=keras.initializers.get(b_initializer),
                    dtype="float32",
                    regularizer=self.kernel_regularizer,
                ),
            )
        self.lora_form = form

    def lora_delta(self):
        """The adapters' update of the kernel, scaled, in float32 (kernel-shaped)."""
        a, b = self.lora_kernel_a, self.lora_kernel_b
        if self.lora_form == "openpi" and self._is_einsum():
            _, _, merge, summed = openpi_lora_equations(self.equation)
            b = ops.sum(b, axis=summed) if summed else b
            delta = ops.einsum(merge, a, b)
        else:
            delta = ops.matmul(a, b)
        return ops.multiply(ops.cast(delta, "float32"), self.lora_scale)

    @property
    def kernel(self):
        if not (self.lora_enabled and self.lora_form == "openpi"):
            return super().kernel
        # Keras' merged kernel, in openpi's form (float kernels only).
        kernel = self._weight("kernel")
        return ops.cast(ops.add(ops.cast(kernel, "float32"), self.lora_delta()), self.compute_dtype)

    def _low_rank_multiply(self):
        """The product `f(x, kernel)` of the layer, or None where the low-rank call does not apply."""
        if self._is_einsum():
            equation = self.equation
            kernel_axes, output_axes = equation.split(",")[1].split("->")
            if self.lora_form != "openpi" and kernel_axes[-1] != output_axes[-1]:
                return None
            return lambda x, kernel: ops.einsum(equation, x, kernel)
        return ops.matmul

    def _lora_update(self, x):
        """The adapters' output for inputs `x`, in `x`'s dtype, before scaling."""
        a = ops.cast(self.lora_kernel_a, x.dtype)
        b = ops.cast(self.lora_kernel_b, x.dtype)
        if not self._is_einsum():
            return ops.matmul(ops.matmul(x, a), b)
        if self.lora_form == "openpi":
            eqn_a, eqn_b, _, _ = openpi_lora_equations(self.equation)
            return ops.einsum(eqn_b, ops.einsum(eqn_a, x, a), b)
        return ops.matmul(ops.einsum(self.equation, x, a), b)

    def call(self, inputs, training=None):
        multiply = self._low_rank_multiply() if self.lora_enabled and self.low_rank_call else None
        if multiply is None:
            return super().call(inputs, training=training)
        # A bfloat16 frozen kernel meets float32 activations: PyTorch does not promote.
        x = multiply(inputs, ops.cast(self._weight("kernel"), inputs.dtype))
        update = self._lora_update(inputs)
        scale = self.lora_scale
        x = ops.add(x, ops.cast(update if scale == 1.0 else update * scale, x.dtype))
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
        if self.lora_enabled and self.lora_form == "openpi":
            raise ValueError(
                f"{self.path!r} has openpi-form LoRA adapters; merge_lora() before quantizing."
            )
        return super().quantize(mode, type_check=False, config=config)

    def merge_lora(self):
        """Folds the adapters into the kernel and removes them.

        Keras' form uses Keras' own merge (the kernel `save_own_variables` of
        Keras' layer writes): float kernels are merged in float32 and stored in
        their dtype; int8 kernels are dequantized, merged and requantized.
        openpi's form merges `float32(kernel) + lora_delta()` into the kernel's
        dtype. The merged kernel keeps its frozen flag.
        """
        if not self.lora_enabled:
            return
        if self.lora_form == "openpi":
            kernel = self._weight("kernel")
            kernel.assign(
                ops.cast(ops.add(ops.cast(kernel, "float32"), self.lora_delta()), kernel.dtype)
            )
        else:
            store = {}
            self.keras_layer_class.save_own_variables(self, store)
            self.keras_layer_class.load_own_variables(self, store)  # merged kernel; A and B zeroed
        del self.lora_kernel_a
        del self.lora_kernel_b
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

    def get_config(self):
        config = super().get_config()
        if self.lora_form != "keras":
            config["lora_form"] = self.lora_form
        return config


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
    >>> per_head = LoRAEinsumDense("btd,ndh->btnh", (None, 2, 4))
    >>> per_head.build((None, None, 8))
    >>> per_head.enable_lora(2, form="openpi")  # openpi's lora.Einsum: a B per head
    >>> tuple(per_head.lora_kernel_a.shape), tuple(per_head.lora_kernel_b.shape)
    ((2, 8, 2), (2, 2, 4))
    """

    keras_layer_class = keras.layers.EinsumDense
