"""openpi's exponential moving average of the weights, on Keras' optimizer-level EMA.

Keras optimizers keep an EMA of the trainable weights (`use_ema=True`,
`ema_momentum`) as optimizer variables, so it is threaded through the
compiled train step, sharded like its weight, and saved with the optimizer
state. Two details differ from openpi's `TrainState.ema_params`:

- Keras starts the average at the weights after the first update (momentum
  0 at step 0); openpi starts it at the initial weights and updates
  `ema = d * ema + (1 - d) * new` from the first step on;
- openpi's average covers every parameter, frozen ones included; frozen
  weights never change, so averaging only the trainable ones is the same.

`OpenpiEMAMixin` gives a Keras optimizer openpi's start. Keras' end is
kept: at the end of `fit` the model's trainable weights are replaced by
their average (`finalize_variable_values`), so the model `fit` returns is
openpi's inference weights (its checkpoints' `params`).
"""

from keras import ops


class OpenpiEMAMixin:
    """Makes a Keras optimizer's EMA start at the initial weights, as openpi's does.

    With `use_ema=True` and `ema_momentum=d` the average is set to the
    weights when the optimizer is built and updated after every step as
    `average = d * average + (1 - d) * weight`.

    Example:
    >>> class AdamW(OpenpiEMAMixin, keras.optimizers.AdamW): ...  # doctest: +SKIP
    """

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self.use_ema:
            for variable, average in zip(variables, self._model_variables_moving_average):
                if average is not None:
                    # A copy: on JAX the average and the weight must not share a buffer
                    # (the train step donates both).
                    average.assign(ops.copy(variable.value))

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        decay = self.ema_momentum
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                average.assign(decay * average + (1.0 - decay) * variable)


def ema_weights(optimizer):
    """`[(weight, average)]` of an optimizer with EMA (empty without).

    Args:
        optimizer: a built Keras optimizer.
    """
    if not getattr(optimizer, "use_ema", False) or not optimizer.built:
        return []
    pairs = zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)
    return [(variable, average) for variable, average in pairs if average is not None]
