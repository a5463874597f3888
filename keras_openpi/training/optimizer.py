"""openpi's optimizer: global-norm clipping, AdamW, a warm-up + cosine schedule, EMA.

openpi (`training/optimizer.py`) trains with `optax.chain(clip_by_global_norm(1.0),
adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-10))` and the schedule
`warmup_cosine_decay_schedule(peak / (warmup + 1), peak, warmup, decay_steps, decay_lr)`;
`AdamW` and `WarmupCosineDecay` here are that optimizer and schedule as Keras objects.
"""

import math

import keras
from keras import ops

from keras_openpi.backend.keras_private import OpenpiEMAMixin


@keras.saving.register_keras_serializable(package="keras_openpi")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """openpi's `CosineDecaySchedule` (optax's `warmup_cosine_decay_schedule`).

    Linear from `peak_lr / (warmup_steps + 1)` at step 0 to `peak_lr` at
    `warmup_steps`, then `decay_lr + (peak_lr - decay_lr) * (1 + cos(pi * t / T)) / 2`
    with `t = step - warmup_steps`, `T = decay_steps - warmup_steps`, and
    `decay_lr` from `decay_steps` on. Step s is the rate of the (s+1)-th update.

    Args:
        warmup_steps: steps of the linear warm-up.
        peak_lr: the rate at the end of the warm-up.
        decay_steps: the step at which the cosine reaches `decay_lr`
            (counted from 0, warm-up included).
        decay_lr: the final rate.

    Example:
    >>> schedule = WarmupCosineDecay(1000, peak_lr=2.5e-5, decay_steps=30_000, decay_lr=2.5e-6)
    >>> [f"{float(schedule(step)):.3g}" for step in (0, 1000, 30_000)]
    ['2.5e-08', '2.5e-05', '2.5e-06']
    """

    def __init__(self, warmup_steps=1_000, peak_lr=2.5e-5, decay_steps=30_000, decay_lr=2.5e-6):
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if int(decay_steps) <= int(warmup_steps):
            raise ValueError(
                f"decay_steps ({decay_steps}) must be larger than warmup_steps ({warmup_steps}): "
                "the cosine runs from the end of the warm-up to decay_steps."
            )
        if peak_lr <= 0 or decay_lr < 0:
            raise ValueError(
                f"peak_lr must be > 0 and decay_lr >= 0, got {peak_lr} and {decay_lr}."
            )
        self.warmup_steps = int(warmup_steps)
        self.peak_lr = float(peak_lr)
        self.decay_steps = int(decay_steps)
        self.decay_lr = float(decay_lr)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.warmup_steps
        start = self.peak_lr / (warmup + 1)
        warming = start + (self.peak_lr - start) * step / max(warmup, 1)
        cosine_steps = self.decay_steps - warmup
        t = ops.clip(step - warmup, 0.0, float(cosine_steps))
        cosine = 0.5 * (1.0 + ops.cos(math.pi * t / cosine_steps))
        decayed = self.decay_lr + (self.peak_lr - self.decay_lr) * cosine
        return ops.where(step < warmup, warming, decayed)

    def get_config(self):
        return {
            "warmup_steps": self.warmup_steps,
            "peak_lr": self.peak_lr,
            "decay_steps": self.decay_steps,
            "decay_lr": self.decay_lr,
        }


@keras.saving.register_keras_serializable(package="keras_openpi")
class AdamW(OpenpiEMAMixin, keras.optimizers.AdamW):
    """openpi's AdamW (optax's `adamw` after `clip_by_global_norm`), with openpi's EMA.

    Per trainable weight `w` with gradient `g` (clipped to a global norm of
    `global_clipnorm`) at update `t` (1-based) and rate `lr`:
    `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
    `w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * weight_decay * w`.
    Keras' `AdamW` adds `eps` to `sqrt(v)` before the bias correction (the
    "epsilon hat" form); this one adds it after, as optax does. With
    `use_ema=True` an EMA of the trainable weights with momentum
    `ema_momentum` starts at the initial weights (see `OpenpiEMAMixin` in `backend/keras_private.py`).

    Args:
        learning_rate: a float or a schedule; default openpi's `WarmupCosineDecay()`.
        weight_decay: decoupled weight decay (openpi: 1e-10, "negligible").
        beta_1, beta_2, epsilon: Adam's (openpi: 0.9, 0.95, 1e-8).
        global_clipnorm: clip the gradients to this global norm (openpi: 1.0).
        **kwargs: Keras optimizer arguments (`use_ema`, `ema_momentum`, `name`, ...).

    Example:
    >>> optimizer = AdamW(use_ema=True, ema_momentum=0.99)
    >>> optimizer.beta_2, optimizer.epsilon, optimizer.global_clipnorm
    (0.95, 1e-08, 1.0)
    """

    def __init__(
        self,
        learning_rate=None,
        weight_decay=1e-10,
        beta_1=0.9,
        beta_2=0.95,
        epsilon=1e-8,
        global_clipnorm=1.0,
        **kwargs,
    ):
        if kwargs.get("amsgrad"):
            raise ValueError("openpi's AdamW has no amsgrad; use keras.optimizers.AdamW for it.")
        kwargs.pop("amsgrad", None)
        super().__init__(
            learning_rate=WarmupCosineDecay() if learning_rate is None else learning_rate,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            global_clipnorm=global_clipnorm,
            **kwargs,
        )

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        self.assign(m, beta_1 * m + (1.0 - beta_1) * gradient)
        self.assign(v, beta_2 * v + (1.0 - beta_2) * ops.square(gradient))
        m_hat = m / (1.0 - ops.power(beta_1, step))
        v_hat = v / (1.0 - ops.power(beta_2, step))
        self.assign_sub(variable, lr * m_hat / (ops.sqrt(v_hat) + self.epsilon))


def make_optimizer(config):
    """The optimizer of an `OptimizerConfig` (`keras_openpi.training.config`) and EMA decay.

    Args:
        config: a `TrainConfig`; its `optimizer` and `ema_decay` are used.

    Returns:
        an `AdamW` with a `WarmupCosineDecay` schedule.
    """
    settings = config.optimizer
    schedule = WarmupCosineDecay(
        warmup_steps=settings.warmup_steps,
        peak_lr=settings.peak_lr,
        decay_steps=settings.decay_steps,
        decay_lr=settings.decay_lr,
    )
    ema = config.ema_decay
    return AdamW(
        learning_rate=schedule,
        weight_decay=settings.weight_decay,
        beta_1=settings.b1,
        beta_2=settings.b2,
        epsilon=settings.eps,
        global_clipnorm=settings.clip_gradient_norm,
        use_ema=ema is not None,
        ema_momentum=0.99 if ema is None else ema,
    )
