"""The train step: each step's loss, gradient norm and learning rate in the logs; augmentation."""

import keras
import numpy as np
import pytest

from keras_openpi.backend.train_step import StepLogsMixin
from keras_openpi.models import Pi0
from keras_openpi.training import WarmupCosineDecay
from training_support import TINY_MODEL
from training_support import tiny_observation


class Linear(StepLogsMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros")

    def call(self, x):
        return self.dense(x)


class StepLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def test_logs_hold_each_steps_loss_grad_norm_and_learning_rate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    schedule = WarmupCosineDecay(warmup_steps=2, peak_lr=0.1, decay_steps=10, decay_lr=0.0)
    model = Linear()
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    logs = StepLogs()
    history = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[logs])

    kernel, bias = np.ones((3, 2)), np.zeros(2)
    for step in range(3):
        xb, yb = x[2 * step : 2 * step + 2], y[2 * step : 2 * step + 2]
        residual = xb @ kernel + bias - yb
        loss = np.mean(residual**2)
        grad_kernel = 2 * xb.T @ residual / residual.size
        grad_bias = 2 * residual.sum(axis=0) / residual.size
        lr = float(schedule(step))
        got = logs.logs[step]
        assert got["loss"] == pytest.approx(loss, rel=1e-5)  # this step's, not the running mean
        assert got["grad_norm"] == pytest.approx(
            np.sqrt(np.sum(grad_kernel**2) + np.sum(grad_bias**2)), rel=1e-5
        )
        assert got["learning_rate"] == pytest.approx(lr, rel=1e-6)
        kernel, bias = kernel - lr * grad_kernel, bias - lr * grad_bias
    assert sorted(history.history) == ["grad_norm", "learning_rate", "loss"]
    assert history.history["loss"][0] == pytest.approx(logs.logs[-1]["loss"])


def test_augmentation_runs_in_training_only_and_is_part_of_the_config():
    observation, actions = tiny_observation(2)
    noise = np.random.default_rng(1).normal(size=actions.shape).astype("float32")
    time = np.array([0.3, 0.7], "float32")
    model = Pi0(**TINY_MODEL, seed=0, augment=True)
    assert model.get_config()["augment"] is True
    assert Pi0(**TINY_MODEL).get_config()["augment"] is False
    evaluate = model.flow_matching_loss(observation, actions, noise, time)
    generator = model.image_augmentation.seed_generator
    state = np.array(generator.state.numpy())
    augmented = model.flow_matching_loss(observation, actions, noise, time, training=True)
    assert not np.allclose(augmented, evaluate, rtol=1e-3)
    # Drawn from the augmentation's seed generator, which advances (a resumed run continues it).
    assert not np.array_equal(generator.state.numpy(), state)
    model.augment = False
    np.testing.assert_allclose(
        model.flow_matching_loss(observation, actions, noise, time, training=True),
        evaluate,
        rtol=1e-6,
    )
