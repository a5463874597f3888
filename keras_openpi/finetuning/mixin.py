"""`FinetuningMixin`: the fine-tuning API of keras_openpi models."""

import json

from keras_openpi.backend.compiled import CompiledProgram
from keras_openpi.finetuning import freezing
from keras_openpi.finetuning import lora
from keras_openpi.finetuning import lora_io
from keras_openpi.finetuning import memory
from keras_openpi.finetuning.serialization import FinetuningState
from keras_openpi.finetuning.serialization import finetuning_config
from keras_openpi.finetuning.serialization import restore_finetuning
from keras_openpi.finetuning.strategies import apply_strategy
from keras_openpi.finetuning.summary import trainable_summary


class FinetuningMixin:
    """LoRA, freezing, memory levers and adapter files for a `keras.Model`.

    The model declares its groups and the mixin does the rest:

    - `finetuning_groups()` returns `{group: {"layers": [...], "lora": [...],
      "openpi_lora_rank": r}}` (π0: `vision`, `vlm`, `action_expert`,
      `projections`; π0-FAST: `vision`, `vlm`; `lora` lists the linear maps
      LoRA adapts when the group is a target);
    - `default_lora_targets()` names the groups `enable_lora()` and the
      `lora` strategy adapt (like keras-hub's `default_lora_layer_names`);
    - `remat_layers()` returns the layers to rematerialize (decoder blocks)
      and `row_chunked_layers()` those computed in row chunks under remat.

    Everything is built on Keras' mechanisms: `variable.trainable` /
    `layer.trainable` for freezing, `Dense.enable_lora` / `EinsumDense.enable_lora`
    for adapters (Keras' form, or openpi's with a per-head B), `Model.quantize`
    for int8. The fine-tuning state is part of
    `get_config()`, so `.keras` files reload with adapters, ranks, alphas,
    frozen flags, dtypes and quantization intact.

    Example:
    >>> model = Pi0("dummy", "dummy", "tiny/16", vocabulary_size=1024,
    ...             action_dim=8, action_horizon=10, max_token_len=16)
    >>> model.enable_lora(rank="openpi")
    >>> model.trainable_summary()["vlm"]["trainable"]
    0
    """

    # === Declared by the model ===

    def finetuning_groups(self):
        """`{group: {"layers": [...], "lora": [...]}}`; see the class docstring."""
        raise NotImplementedError(
            f"{type(self).__name__} must declare finetuning_groups() to use FinetuningMixin."
        )

    def default_lora_targets(self):
        """The groups `enable_lora()` and the `lora` strategy adapt; see the class docstring."""
        raise NotImplementedError(
            f"{type(self).__name__} must declare default_lora_targets() to use FinetuningMixin."
        )

    def remat_layers(self):
        """The layers `enable_remat` rematerializes; none unless the model says so."""
        return []

    def row_chunked_layers(self):
        """The layers computed in row chunks under remat (JAX); none unless the model says so."""
        return []

    @property
    def finetuning_state(self):
        """The `FinetuningState` (strategy, LoRA configuration, frozen dtype, remat)."""
        if "_finetuning_state" not in vars(self):
            self._finetuning_state = FinetuningState()
        return self._finetuning_state

    def reset_train_functions(self):
        """Drops compiled train/test/predict steps after a change to the trainable set."""
        self.train_function = None
        self.test_function = None
        self.predict_function = None

    # === Strategies and freezing ===

    def apply_strategy(self, strategy="full", **options):
        """Applies a named strategy; see `keras_openpi.finetuning.apply_strategy`."""
        return apply_strategy(self, strategy, **options)

    def freeze(self, *patterns, groups=()):
        """Freezes the weights of `groups` and those whose relative path fully matches a pattern.

        Example: `model.freeze("gemma/decoder_block_[0-8]/vlm/.*", groups=["vision"])`.
        """
        freezing.freeze(self, patterns, groups)
        self.reset_train_functions()

    def unfreeze(self, *patterns, groups=()):
        """Unfreezes the selected weights (never int8 kernels or LoRA base kernels)."""
        freezing.unfreeze(self, patterns, groups)
        self.reset_train_functions()

    # === LoRA ===

    def enable_lora(self, rank=16, alpha=None, targets=None, freeze_vision=False, form="keras"):
        """Adds LoRA adapters to every linear map of the target groups.

        Each attention projection (query, key, value, output) and feed-forward
        matrix (gate, up, down) of a target gets adapters A and B, in one of
        two forms:

        - `form="keras"` (the default): Keras' `Dense.enable_lora` /
          `EinsumDense.enable_lora`. A: `kernel.shape[:-1] + (rank,)`,
          He-uniform; B: `(rank, kernel.shape[-1])`, zeros, one B shared by
          all heads; every update `alpha / rank * A @ B`.
        - `form="openpi"`: openpi's `lora.Einsum` and `lora.FeedForward`. A
          per-head B on the attention einsums (query (N, r, H), key and value
          (K, r, H), output (N, r, D)); the einsums' updates scaled by
          `alpha / rank`, the feed-forward ones not scaled (openpi ignores
          alpha there); A and B start N(0, 0.01). The weights and trainable
          counts are openpi's for the same rank; with `rank="openpi"` this is
          openpi's `gemma_2b_lora` + `gemma_300m_lora` exactly.

        Frozen afterwards, exactly as openpi's `*_lora` configurations: every
        other weight of a target (base kernels, norms, and for the VLM its
        token embedding; π0.5's adaRMS projections). Vision and projections
        keep training unless `freeze_vision` (openpi's π0-FAST LoRA config
        freezes vision too).

        Args:
            rank: positive int, dict per target, or `"openpi"` (VLM 16, π0's
                action expert 32).
            alpha: number, dict per target, or None (alpha = rank).
            targets: groups to adapt, e.g. `("vlm", "action_expert")`,
                `("vlm",)` or `("action_expert",)`; None for the model's
                `default_lora_targets()`.
            freeze_vision: also freeze the vision encoder.
            form: `"keras"` or `"openpi"` (float kernels only).
        """
        config = lora.resolve_lora_config(self, rank, alpha, targets, form)
        lora.add_adapters(self, config)
        if freeze_vision:
            freezing.freeze(self, groups=["vision"])
        self.finetuning_state.lora.update(config)
        self.reset_train_functions()

    def merge_lora(self):
        """Folds the adapters into their kernels and removes them, in place; returns the model.

        In float the merged model's outputs equal the LoRA model's (to float
        rounding); int8 kernels are requantized after the merge.
        """
        lora.merge_adapters(self)
        self.finetuning_state.lora = {}
        self.reset_train_functions()
        return self

    def save_lora_weights(self, path):
        """Writes the trainable weights (adapters and any other trained weight) to `path` (npz)."""
        lora_io.save_lora_weights(self, path, self.get_config().get("finetuning"))

    def load_lora_weights(self, path):
        """Loads a file of `save_lora_weights`.

        On a model without adapters (e.g. a freshly converted base model) the
        file's fine-tuning (adapters, frozen set, dtypes) is applied first; a
        model with adapters must have the file's LoRA configuration.
        """
        meta, arrays = lora_io.read_lora_weights(path)
        record = meta.get("finetuning") or {}
        saved = record.get("lora") or {}
        if lora.adapted_layers(self):
            current = {k: dict(v) for k, v in self.finetuning_state.lora.items()}
            if current != saved:
                raise ValueError(
                    f"{path} holds LoRA {json.dumps(saved)}, the model has "
                    f"{json.dumps(current)}."
                )
        elif record:
            if self.finetuning_state.frozen_dtype:
                raise ValueError(
                    f"Load {path} into a float model: its fine-tuning is applied before loading."
                )
            self._finetuning_state = restore_finetuning(self, record)
            self.reset_train_functions()
        lora_io.assign_lora_weights(self, arrays, path)

    # === Memory ===

    def cast_frozen_to(self, dtype="bfloat16"):
        """Stores frozen weights in `dtype` (openpi: bfloat16); trainable ones keep theirs."""
        count = memory.cast_frozen(self, dtype)
        self.finetuning_state.frozen_dtype = dtype
        self.reset_train_functions()
        return count

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras' `Model.quantize` (e.g. `"int8"` before `enable_lora`: QLoRA), made fast.

        Keras collects garbage once per replaced kernel; here those collections
        skip the objects alive before the call (see `memory.frozen_heap`).
        openpi-form adapters adapt float kernels: merge them first.
        """
        openpi_form = [
            layer.path
            for layer in lora.adapted_layers(self)
            if getattr(layer, "lora_form", "keras") == "openpi"
        ]
        if openpi_form:
            raise ValueError(
                f"{self.name!r} has openpi-form LoRA adapters ({openpi_form[0]!r}, ...); "
                "merge_lora() before quantizing."
            )
        with memory.frozen_heap():
            return super().quantize(mode, config=config, filters=filters, **kwargs)

    def enable_sequencing(self, enabled=True):
        """Runs `remat_layers()` strictly one after another on JAX (see `backend.sequencing`).

        On by default where JAX's default device is a CPU: XLA's CPU scheduler
        would otherwise hold a float32 copy of every bfloat16 / int8 weight at
        once. Outputs are unchanged.
        """
        memory.set_sequencing(self, enabled)
        self.reset_train_functions()
        for value in vars(self).values():
            if isinstance(value, CompiledProgram):
                value.reset()

    def enable_remat(self, enabled=True):
        """Rematerializes `remat_layers()` in training (less activation memory, ~1 more forward)."""
        memory.set_remat(self, enabled)
        self.finetuning_state.remat = bool(enabled)
        self.reset_train_functions()

    # === Inspection ===

    def trainable_summary(self, optimizer_slots=2):
        """Per-group trainable / frozen counts and bytes; `print()` it for the table."""
        state = self.finetuning_state
        lora_text = ", ".join(
            f"{t} r={c['rank']} alpha={c['alpha']:g}"
            + (f" {lora.lora_form(c)} form" if lora.lora_form(c) != "keras" else "")
            for t, c in state.lora.items()
        )
        title = f"{self.name}: strategy {state.strategy or 'custom'}" + (
            f", LoRA {lora_text}" if lora_text else ""
        )
        return trainable_summary(self, optimizer_slots, title)

    # === Serialization ===

    def get_config(self):
        config = super().get_config()
        record = finetuning_config(self, self.finetuning_state)
        if record:
            config["finetuning"] = record
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        record = config.pop("finetuning", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if record:
            model._finetuning_state = restore_finetuning(model, record)
        return model
