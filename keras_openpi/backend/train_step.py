"""`fit`'s training step with the loss, gradient norm and learning rate of each step in its logs."""

import keras
from keras import ops


def global_norm(tensors):
    """The global L2 norm of a list of tensors (None entries skipped), in float32.

    Example:
    >>> float(global_norm([keras.ops.ones((3,)), None, keras.ops.ones((1,))]))
    2.0
    """
    squares = [ops.sum(ops.square(ops.cast(t, "float32"))) for t in tensors if t is not None]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack(squares)))


class StepLogsMixin:
    """Logs, at every `fit` step: `loss` (this step's), `grad_norm` and `learning_rate`.

    openpi logs the loss, the global norm of the raw gradients (before
    clipping) and the learning rate per step. Keras' default `loss` log is the
    running mean since the start of the epoch, which says little in a
    policy's single long epoch of 30k steps; with this mixin `loss` is the loss
    of the step itself, `grad_norm` the global norm of its gradients (over the
    trainable weights, before clipping, unscaled) and `learning_rate` the rate
    the optimizer applied. Validation logs are Keras' as usual.

    The train step is Keras' JAX train step with the two values added (the
    gradients exist only inside it). On the other backends Keras' own step
    runs and the logs are Keras' (no `grad_norm` nor `learning_rate`).

    With `skip_nonfinite_updates` set (before the first `fit`; JAX only), a
    step whose loss or gradient norm is NaN or inf changes neither the
    weights nor the optimizer's moments and EMA: the batch is consumed and
    the step counted (the learning-rate schedule advances), the update is
    dropped (a `where` in the compiled step, no host sync).

    Example:
    >>> class Regressor(StepLogsMixin, keras.Model): ...  # doctest: +SKIP
    >>> model.fit(x, y).history.keys()  # doctest: +SKIP
    dict_keys(['grad_norm', 'learning_rate', 'loss'])
    """

    skip_nonfinite_updates = False

    def train_step(self, *args):
        if keras.backend.backend() != "jax":
            return super().train_step(*args)
        return _jax_train_step(self, *args)


def _jax_train_step(model, state, data):
    import jax

    trainable, non_trainable, optimizer_values, metrics_values = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
    (_, aux), grads = grad_fn(
        trainable,
        non_trainable,
        metrics_values,
        x,
        y,
        sample_weight,
        training=True,
        optimizer_variables=optimizer_values,
    )
    loss, y_pred, non_trainable, metrics_values = aux

    optimizer = model.optimizer
    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
        learning_rate = ops.cast(optimizer.learning_rate, "float32")
    grad_norm = global_norm(grads)
    if optimizer.loss_scale_factor is not None:
        grad_norm = grad_norm / optimizer.loss_scale_factor

    updated, updated_optimizer = optimizer.stateless_apply(optimizer_values, grads, trainable)
    if model.skip_nonfinite_updates:
        finite = ops.logical_and(ops.isfinite(loss), ops.isfinite(grad_norm))
        updated = [ops.where(finite, new, old) for new, old in zip(updated, trainable)]
        updated_optimizer = [
            new if variable is optimizer.iterations else ops.where(finite, new, old)
            for variable, new, old in zip(optimizer.variables, updated_optimizer, optimizer_values)
        ]
    trainable, optimizer_values = updated, updated_optimizer
    logs, metrics_values = _update_metrics(model, metrics_values, loss, x, y, y_pred, sample_weight)
    logs = {**logs, "loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate}
    return logs, (trainable, non_trainable, optimizer_values, metrics_values)


def _update_metrics(model, metrics_values, loss, x, y, y_pred, sample_weight):
    """Keras' metric update of a JAX train step, stateless, through the public API.

    The running-mean `loss` tracker is updated (weighted by the batch size, as
    Keras does), then the compiled metrics (`compute_metrics`); returns the
    logs and the new metric variable values.
    """
    mapping = list(zip(model.metrics_variables, metrics_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        batch_size = next(v for v in keras.tree.flatten(x) if v is not None).shape[0]
        for metric in model.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=batch_size)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    values = []
    for variable in model.metrics_variables:
        value = scope.get_current_value(variable)
        values.append(variable.value if value is None else value)
    return logs, values
