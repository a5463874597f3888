"""openpi's optimizer in Keras: the warm-up + cosine schedule, AdamW's update, EMA semantics."""

import math

import keras
import numpy as np
import pytest

from keras_openpi.training import AdamW
from keras_openpi.training import WarmupCosineDecay
from keras_openpi.training import get_config
from keras_openpi.backend.keras_private import ema_pairs
from keras_openpi.training.optimizer import make_optimizer


def optax_warmup_cosine(step, warmup, peak, decay_steps, end):
    """openpi's schedule: optax's warmup_cosine_decay_schedule(peak / (warmup + 1), peak, ...)."""
    init = peak / (warmup + 1)
    if step < warmup:  # optax.linear_schedule(init, peak, warmup)
        return (init - peak) * (1 - step / warmup) + peak
    count = min(
        step - warmup, decay_steps - warmup
    )  # optax.cosine_decay_schedule(peak, decay_steps - warmup, alpha)
    alpha = end / peak
    cosine = 0.5 * (1 + math.cos(math.pi * count / (decay_steps - warmup)))
    return peak * ((1 - alpha) * cosine + alpha)


@pytest.mark.parametrize(
    "settings, steps",
    [
        (
            (1_000, 2.5e-5, 30_000, 2.5e-6),
            [0, 1, 500, 999, 1000, 1001, 15_500, 29_999, 30_000, 45_000],
        ),
        ((10_000, 5e-5, 1_000_000, 5e-5), [0, 5_000, 10_000, 20_000, 999_999]),  # pi05_libero
        ((0, 1e-3, 100, 0.0), [0, 1, 50, 100, 200]),
    ],
)
def test_schedule_equals_openpis_formula(settings, steps):
    schedule = WarmupCosineDecay(*settings)
    for step in steps:
        expected = optax_warmup_cosine(step, *settings)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12), step


def test_schedule_defaults_and_errors():
    schedule = WarmupCosineDecay()
    assert float(schedule(0)) == pytest.approx(2.5e-5 / 1001, rel=1e-6)
    assert float(schedule(1000)) == pytest.approx(2.5e-5, rel=1e-6)
    assert float(schedule(30_000)) == pytest.approx(2.5e-6, rel=1e-6)
    restored = WarmupCosineDecay.from_config(schedule.get_config())
    assert restored.get_config() == {
        "warmup_steps": 1000,
        "peak_lr": 2.5e-5,
        "decay_steps": 30000,
        "decay_lr": 2.5e-6,
    }
    with pytest.raises(
        ValueError, match=r"decay_steps \(10\) must be larger than warmup_steps \(10\)"
    ):
        WarmupCosineDecay(10, 1e-3, 10, 0.0)


def test_optimizer_hyperparameters_are_openpis():
    optimizer = make_optimizer(get_config("pi0_libero"))
    assert isinstance(optimizer, AdamW)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.9, 0.95, 1e-8)
    assert optimizer.weight_decay == 1e-10 and optimizer.global_clipnorm == 1.0
    assert optimizer.use_ema and optimizer.ema_momentum == 0.99
    assert optimizer._learning_rate.get_config() == WarmupCosineDecay().get_config()
    lora = make_optimizer(get_config("pi0_libero_lora"))
    assert not lora.use_ema
    pi05 = make_optimizer(get_config("pi05_libero"))
    assert pi05.ema_momentum == 0.999
    assert pi05._learning_rate.get_config() == {
        "warmup_steps": 10_000,
        "peak_lr": 5e-5,
        "decay_steps": 1_000_000,
        "decay_lr": 5e-5,
    }
    config = keras.optimizers.serialize(optimizer)
    assert keras.optimizers.deserialize(config).get_config() == optimizer.get_config()
    with pytest.raises(ValueError, match="openpi's AdamW has no amsgrad"):
        AdamW(amsgrad=True)


def optax_adamw_steps(weights, grads, lrs, b1, b2, eps, wd, clip):
    """clip_by_global_norm(clip) then optax.adamw, in numpy float64."""
    weights = [w.astype(np.float64) for w in weights]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in step_grads))
        step_grads = [g if norm < clip else g / norm * clip for g in step_grads]
        for i, g in enumerate(step_grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g**2
            update = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps) + wd * weights[i]
            weights[i] = weights[i] - lr * update
    return weights


def test_adamw_update_equals_optax_adamw_after_clipping():
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")]
    grads = [
        [rng.normal(size=w.shape).astype("float32") * scale for w in initial]
        for scale in (3.0, 0.01, 1.0)
    ]
    schedule = WarmupCosineDecay(warmup_steps=1, peak_lr=0.1, decay_steps=5, decay_lr=0.01)
    lrs = [float(schedule(step)) for step in range(3)]
    settings = dict(
        b1=0.9, b2=0.95, eps=1e-3, wd=0.1, clip=1.0
    )  # a large eps shows where it is added
    expected = optax_adamw_steps(initial, grads, lrs, **settings)

    def run(optimizer):
        variables = [keras.Variable(w) for w in initial]
        for step_grads in grads:
            optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_grads], variables)
        return [np.asarray(v.numpy()) for v in variables]

    ours = run(AdamW(schedule, weight_decay=0.1, epsilon=1e-3))
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    keras_adamw = keras.optimizers.AdamW(
        schedule, weight_decay=0.1, beta_1=0.9, beta_2=0.95, epsilon=1e-3, global_clipnorm=1.0
    )
    assert (
        np.max(np.abs(run(keras_adamw)[0] - expected[0])) > 1e-4
    )  # Keras adds eps before bias correction


def test_ema_starts_at_the_initial_weights_as_openpi():
    initial = np.array([1.0, -2.0, 3.0], "float32")
    variable = keras.Variable(initial)
    optimizer = AdamW(0.1, use_ema=True, ema_momentum=0.9, global_clipnorm=None, weight_decay=0.0)
    optimizer.build([variable])
    (pair,) = ema_pairs(optimizer)
    np.testing.assert_array_equal(pair[1].numpy(), initial)  # openpi: ema_params = params at init
    ema = initial.astype(np.float64)
    for step in range(3):
        optimizer.apply([keras.ops.ones((3,)) * (step + 1)], [variable])
        ema = 0.9 * ema + 0.1 * np.asarray(
            variable.numpy(), np.float64
        )  # openpi's update, every step
        np.testing.assert_allclose(pair[1].numpy(), ema, rtol=1e-6)
    # Keras' own EMA starts at the first updated weights instead.
    other = keras.Variable(initial)
    keras_optimizer = keras.optimizers.AdamW(0.1, use_ema=True, ema_momentum=0.9, weight_decay=0.0)
    keras_optimizer.apply([keras.ops.ones((3,))], [other])
    np.testing.assert_allclose(
        keras_optimizer._model_variables_moving_average[0].numpy(), other.numpy()
    )


def test_fit_ends_with_the_ema_weights():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=AdamW(0.05, use_ema=True, ema_momentum=0.5), loss="mse")
    raw = {}

    class Capture(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw["kernel"] = np.array(self.model.layers[0].kernel.numpy())
            raw["average"] = np.array(ema_pairs(self.model.optimizer)[0][1].numpy())

    x = np.arange(8, dtype="float32").reshape(4, 2)
    model.fit(x, x[:, :1], batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[Capture()])
    assert not np.allclose(raw["kernel"], raw["average"])
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), raw["average"])
