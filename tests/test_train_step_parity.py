"""keras_openpi's training step against openpi's own (tests/fixtures/openpi_train), float32.

From the weights and inputs of the forward fixtures (tests/fixtures/openpi)
and openpi's flow-matching noise and time of each step, keras_openpi's train
step — the compiled function `fit` runs (`StepLogsMixin.train_step`, reached
here through `train_on_batch`), with `make_optimizer`'s AdamW, warm-up +
cosine schedule and EMA for the fixture's settings — must give openpi's loss,
gradients, logged gradient norm and learning rate, weights after 3 steps and
EMA weights. `optimizer.npz` pins the optimizer alone (optax through openpi's
`create_optimizer`, given gradients), where the only differences are float32
roundings.

Measures:
- gradients, per Keras weight (a slice of an openpi parameter) with reference
  gradient `g_ref` and ours `g`: `max|g - g_ref| / max|g_ref|` <= 1e-5. The
  weights the loss does not depend on have a gradient that is zero up to
  rounding in both (`max|g_ref|`, `max|g|` below 1e-6 of the model's largest
  gradient element): the VLM's last layer after its keys and values (only the
  action expert's outputs enter the loss), and SigLIP's attention key biases
  (they add the same amount to every logit of a query, which the softmax
  removes). The test asserts that these, and only these, are that group;
- weights after 3 steps and EMA weights: `max|w - w_ref|` <= 1e-5 per weight;
- the EMA: keras_openpi's average starts at the initial weights and follows
  openpi's rule `ema = 0.99 * ema + 0.01 * new` at every step, applied to
  keras_openpi's own weights of that step (within 1 float32 ulp of the larger
  operand, per element),
  a check the 1e-5 bound alone could not make (3 EMA steps move a weight by
  ~1e-6): an average of the weights before the update, or one started after
  the first step (Keras' default), is off by many ulps;
- the optimizer alone: per step, `max|w - w_ref|` <= 1e-6 and
  `max|w - w_ref| / max|w_ref - w_0|` <= 1e-4 (optax's Adam rounds differently
  from Keras' by a few ulps; an eps in the wrong place or a missing bias
  correction is off by > 1e-2).
"""

import dataclasses
import pathlib

import keras
import numpy as np
import pytest

from keras_openpi.convert import pi0_from_openpi
from keras_openpi.convert.pi0_weights import pi0_weight_map
from keras_openpi.training import OptimizerConfig
from keras_openpi.training import get_config
from keras_openpi.backend.keras_private import ema_pairs
from keras_openpi.training.optimizer import make_optimizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "openpi_train"
TOLERANCE = 1e-5
ZERO_GRADIENT = 1e-6  # of the model's largest gradient element

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the train step under test is the JAX one"
)


def load(name):
    path = FIXTURES / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(
            f"fixture {path} not found: tests/fixtures/openpi_train/generate.py regenerates it."
        )
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def train_config(schedule, optimizer, ema_decay):
    """A `TrainConfig` with the given optimizer, schedule and EMA (the rest is unused)."""
    settings = OptimizerConfig(**schedule, **optimizer)
    return dataclasses.replace(get_config("pi0_libero"), optimizer=settings, ema_decay=ema_decay)


def drive_noise_and_time(model):
    """Makes the model's loss take the flow-matching noise and time from the batch.

    The batch's observation carries them as `noise` (B, H, action_dim) and
    `time` (B,); `compute_loss` (the model's own) passes them on to
    `flow_matching_loss` instead of drawing them.
    """
    flow_matching_loss = model.flow_matching_loss

    def driven(observation, actions, noise=None, time=None, training=False):
        observation = dict(observation)
        noise, time = observation.pop("noise"), observation.pop("time")
        return flow_matching_loss(observation, actions, noise=noise, time=time, training=training)

    object.__setattr__(model, "flow_matching_loss", driven)


def relative_path(model, variable):
    return variable.path[len(model.name) + 1 :]


def openpi_view(model):
    """`{Keras path: (openpi path, select)}` for every trainable weight."""
    paths = {relative_path(model, v) for v in model.trainable_variables}
    view = {k: (p, select) for p, k, select in pi0_weight_map(model) if k in paths}
    assert set(view) == paths
    return view


def errors(values, reference, view, prefix):
    """`{Keras path: (max|value - ref|, max|ref|)}`, `ref` the openpi array's slice."""
    out = {}
    for keras_path, (openpi_path, select) in view.items():
        ref = np.asarray(select(reference[f"{prefix}/{openpi_path}"]), np.float64)
        value = np.asarray(values[keras_path], np.float64)
        assert value.shape == ref.shape, keras_path
        out[keras_path] = (np.abs(value - ref).max(), np.abs(ref).max())
    return out


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def run(request, openpi_fixture):
    """Builds the fixture's model, takes its gradients, trains it 3 steps; returns what to compare."""
    import jax

    name = request.param
    reference = load(f"{name}_grads")
    meta = eval(str(reference["meta"]))  # a repr'd dict of plain values
    forward = openpi_fixture(meta["fixture"])
    model = pi0_from_openpi(
        forward.path,
        action_horizon=meta["action_horizon"],
        max_token_len=meta["max_token_len"],
        model="pi05" if meta["pi05"] else "pi0",
    )
    assert not model.augment and not meta["augmentation"]
    drive_noise_and_time(model)
    config = train_config(meta["schedule"], meta["optimizer"], meta["ema_decay"])
    model.compile(optimizer=make_optimizer(config), jit_compile=True)  # as the Trainer does
    model.optimizer.build(model.trainable_variables)
    observation = forward.observation(model.image_keys)
    actions = forward["input/actions"]
    batches = [
        {**observation, "noise": reference[f"step/{k}/noise"], "time": reference[f"step/{k}/time"]}
        for k in range(meta["steps"])
    ]

    def weights():
        return {relative_path(model, v): keras.ops.convert_to_numpy(v) for v in model.trainable_variables}

    # The gradients the train step takes: of `compute_loss_and_updates`, as `_jax_train_step`.
    grad_fn = jax.jit(
        jax.value_and_grad(model.compute_loss_and_updates, has_aux=True),
        static_argnames=("training",),
    )
    (loss, _), grads = grad_fn(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.metrics_variables],
        batches[0],
        actions,
        None,
        training=True,
        optimizer_variables=[v.value for v in model.optimizer.variables],
    )
    paths = [relative_path(model, v) for v in model.trainable_variables]
    def averages():
        pairs = ema_pairs(model.optimizer)
        return {relative_path(model, v): keras.ops.convert_to_numpy(a) for v, a in pairs}

    steps, ema_steps, logs = [weights()], [averages()], []
    for batch in batches:
        logs.append(model.train_on_batch(batch, actions, return_dict=True))
        steps.append(weights())
        ema_steps.append(averages())
    return dict(
        name=name, meta=meta, model=model, view=openpi_view(model), reference=reference,
        loss=float(loss), grads=dict(zip(paths, (np.asarray(g) for g in grads))),
        logs=logs, steps=steps, ema_steps=ema_steps,
    )


@pytest.mark.slow
def test_loss_and_gradients(run):
    reference, model = run["reference"], run["model"]
    assert run["loss"] == pytest.approx(float(reference["step/0/loss"]), abs=TOLERANCE)
    found = errors(run["grads"], reference, run["view"], "grads")
    largest = max(ref for _, ref in found.values())
    zero = {k for k, (_, ref) in found.items() if ref <= ZERO_GRADIENT * largest}
    last = f"gemma/decoder_block_{model.gemma.depth - 1}/vlm"
    expected_zero = {
        f"{last}/attention/query/kernel", f"{last}/attention/output/kernel",
        f"{last}/pre_feed_forward_norm/scale", f"{last}/feed_forward/gate/kernel",
        f"{last}/feed_forward/up/kernel", f"{last}/feed_forward/down/kernel",
        "gemma/vlm_final_norm/scale",
        *(f"vision_encoder/encoder_block_{j}/attention/key/bias"
          for j in range(len(model.vision_encoder.blocks))),
    }
    assert zero == expected_zero
    for path in zero:
        assert np.abs(run["grads"][path]).max() <= ZERO_GRADIENT * largest, path
    relative = {k: error / ref for k, (error, ref) in found.items() if k not in zero}
    worst = max(relative, key=relative.get)
    print(f"{run['name']}: largest gradient error {relative[worst]:.2g} of the largest element ({worst})")
    for path, value in relative.items():
        assert value <= TOLERANCE, (path, value)


@pytest.mark.slow
def test_step_logs(run):
    reference = run["reference"]
    assert len(run["logs"]) == run["meta"]["steps"] == 3
    for step, logs in enumerate(run["logs"]):
        assert float(logs["loss"]) == pytest.approx(
            float(reference[f"step/{step}/loss"]), abs=TOLERANCE
        )
        assert float(logs["grad_norm"]) == pytest.approx(
            float(reference[f"step/{step}/grad_norm"]), rel=TOLERANCE
        )
        assert float(logs["learning_rate"]) == pytest.approx(
            float(reference[f"step/{step}/learning_rate"]), rel=1e-6
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["params", "ema"])
def test_weights_after_three_steps(run, kind):
    values = (run["steps"] if kind == "params" else run["ema_steps"])[-1]
    assert set(values) == set(run["view"])
    found = errors(values, load(f"{run['name']}_{kind}"), run["view"], kind)
    worst = max(found, key=lambda k: found[k][0])
    print(f"{run['name']} {kind}: largest error {found[worst][0]:.2g} ({worst})")
    for path, (error, _) in found.items():
        assert error <= TOLERANCE, (path, error)


@pytest.mark.slow
def test_ema_follows_openpis_rule(run):
    """openpi's `train_step`: `ema = d * ema + (1 - d) * new_params`, `ema` starting at the initial weights."""
    decay = run["meta"]["ema_decay"]
    d, rest = np.float32(decay), np.float32(1 - decay)  # as Python floats meet float32 arrays in jax
    steps, ema_steps = run["steps"], run["ema_steps"]
    assert set(ema_steps[0]) == set(steps[0])
    for path in steps[0]:
        np.testing.assert_array_equal(ema_steps[0][path], steps[0][path])
        for step in range(1, len(steps)):
            previous, weight = ema_steps[step - 1][path], steps[step][path]
            error = np.abs(ema_steps[step][path].astype(np.float64) - (d * previous + rest * weight))
            ulp = np.spacing(np.maximum(np.abs(previous), np.abs(weight)))
            assert np.all(error <= ulp), (path, step, float(np.max(error / ulp)))


@pytest.mark.parametrize("case", ["openpi", "decay"])
def test_optimizer_matches_optax(case):
    """`make_optimizer`'s AdamW and schedule against openpi's `create_optimizer`, given gradients."""
    fixture = load("optimizer")
    meta = eval(str(fixture["meta"]))
    settings = dict(b1=0.9, b2=0.95, eps=1e-8, clip_gradient_norm=1.0)
    settings["weight_decay"] = meta["weight_decay"][case]
    optimizer = make_optimizer(train_config(meta["schedule"], settings, None))
    leaves = sorted(k.rsplit("/", 1)[1] for k in fixture if k.startswith(f"{case}/params0/"))
    initial = [fixture[f"{case}/params0/{leaf}"] for leaf in leaves]
    variables = [keras.Variable(value, name=leaf) for value, leaf in zip(initial, leaves)]
    optimizer.build(variables)
    weights = [v.value for v in variables]
    state = [v.value for v in optimizer.variables]
    for step in range(meta["steps"]):
        with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, state))):
            learning_rate = float(optimizer.learning_rate)
        assert learning_rate == pytest.approx(float(fixture[f"{case}/learning_rate"][step]), rel=1e-6)
        grads = [fixture[f"{case}/grads/{step}/{leaf}"] for leaf in leaves]
        weights, state = optimizer.stateless_apply(state, grads, weights)
        for leaf, value, start in zip(leaves, weights, initial):
            reference = fixture[f"{case}/params/{step}/{leaf}"]
            error = np.abs(np.asarray(value, np.float64) - reference).max()
            moved = np.abs(reference.astype(np.float64) - start).max()
            assert error <= 1e-6 and error <= 1e-4 * moved, (step, leaf, error, moved)
