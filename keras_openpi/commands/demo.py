"""`keras-openpi demo`: train a small π0 on the procedural reach task, save, reload, sample.

Everything is generated here: no download, no dataset, no tokenizer file.
The model is π0 with small dimensions; the flow is the real one (openpi's
flow-matching loss under `model.fit`, a `.keras` file, Euler sampling).
"""

import os
import time
import warnings

import numpy as np

from keras_openpi.data.procedural import STATE_NAMES
from keras_openpi.data.procedural import make_reach_episode
from keras_openpi.data.procedural import make_reach_episodes
from keras_openpi.data.procedural import reach_batch

# Keras and the model are imported where they are used: `keras-openpi --help`
# builds this command's parser without them.

HELD_OUT_START = 1_000_000  # episode indices of the held-out split
HELD_OUT_EPISODES = 4
NUM_SAMPLING_STEPS = 10


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="train a small π0 on a generated reach task, save it as .keras, reload and sample",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument(
        "--output",
        default=os.path.join("outputs", "demo_pi0.keras"),
        help="the .keras file to write (default outputs/demo_pi0.keras)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data, init and noise seed")
    return parser


def run(args):
    run_demo(
        steps=args.steps, batch_size=args.batch_size, output=args.output, seed=args.seed
    )
    return 0


def _take(observation, count):
    import keras

    return keras.tree.map_structure(lambda x: x[:count], observation)


def _training_data(steps, batch_size, seed, tokenizer, config):
    needed, episodes = steps * batch_size, []
    while sum(len(e["state"]) for e in episodes) < needed:
        episodes.append(make_reach_episode(seed, len(episodes), config["image_resolution"][0]))
    observation, actions = reach_batch(
        episodes, tokenizer, config["action_dim"], config["action_horizon"]
    )
    return _take(observation, needed), actions[:needed], len(episodes)


def _held_out_loss_fn(model, observation, actions, noise, time_):
    """A function giving `model`'s mean flow-matching loss with fixed noise and time (compiled once)."""
    from keras_openpi.backend import CompiledProgram

    program = CompiledProgram(model, model.flow_matching_loss)
    return lambda: float(np.mean(np.asarray(program(observation, actions, noise, time_))))


def _sample(model, observation, noise):
    return np.asarray(model.sample_actions(observation, noise=noise, num_steps=NUM_SAMPLING_STEPS))


def _action_error(sampled, actions):
    width = len(STATE_NAMES)  # the task's own dims; the rest is padding
    return float(np.mean(np.abs(sampled[..., :width] - actions[..., :width])))


def run_demo(
    steps=60,
    batch_size=16,
    output=os.path.join("outputs", "demo_pi0.keras"),
    seed=0,
    learning_rate=3e-3,
    model_config=None,
    verbose=1,
    log=print,
):
    """Trains a small π0 on the reach task, saves, reloads and samples from it.

    Args:
        steps: training steps (one epoch of `steps * batch_size` frames).
        batch_size: frames per step.
        output: path of the `.keras` file to write.
        seed: seeds the data, the initialization, the noise and the shuffling.
        learning_rate: peak of the warm-up + cosine schedule of AdamW.
        model_config: `Pi0` arguments replacing `DEMO_MODEL`'s.
        verbose: `model.fit` verbosity (1: a progress bar).
        log: where the report lines go.

    Returns:
        dict with `loss_before`, `loss_after` (held-out flow-matching loss
        with fixed noise and time), `reloaded_loss` (the same, measured on the
        reloaded model), `action_error_before`, `action_error_after` (mean
        absolute error of sampled actions vs the expert's on the held-out
        frames, by the untrained and the reloaded model), `hold_still_error`
        (the same for a robot that does not move), `sampled_actions` (the
        reloaded model's held-out actions, (B, H, action_dim)), `output`,
        `num_parameters`, `seconds`.

    Example:
    >>> result = run_demo(steps=10, batch_size=4, output="/tmp/demo.keras", verbose=0, log=None)
    >>> result["loss_after"] < result["loss_before"]
    True
    """
    import keras

    from keras_openpi.models.pi0 import Pi0
    from keras_openpi.models.presets import DEMO_MODEL
    from keras_openpi.tokenizers import ByteTokenizer

    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}.")
    if not output.endswith(".keras"):
        raise ValueError(f"--output must end in .keras, got {output!r}.")
    log = log or (lambda *_: None)
    start = time.perf_counter()
    config = {**DEMO_MODEL, **(model_config or {})}
    keras.utils.set_random_seed(seed)
    tokenizer = ByteTokenizer(config["max_token_len"])

    # === Data ===
    train_x, train_y, num_episodes = _training_data(steps, batch_size, seed, tokenizer, config)
    held_out = make_reach_episodes(
        HELD_OUT_EPISODES, seed, start=HELD_OUT_START, image_size=config["image_resolution"][0]
    )
    test_x, test_y = reach_batch(
        held_out, tokenizer, config["action_dim"], config["action_horizon"]
    )
    rng = np.random.default_rng([seed, HELD_OUT_START])
    noise = rng.standard_normal(test_y.shape).astype(np.float32)
    time_ = (rng.beta(1.5, 1.0, size=len(test_y)) * 0.999 + 0.001).astype(np.float32)
    log(
        f"reach task: {len(train_y)} training frames from {num_episodes} episodes, "
        f"{len(test_y)} held-out frames; e.g. {held_out[0]['prompt']!r}"
    )

    # === Model ===
    model = Pi0(**config, vocabulary_size=tokenizer.vocabulary_size, seed=seed)
    # openpi's warm-up + cosine schedule (linear from peak / (warmup + 1)), 10% warm-up.
    warmup = max(steps // 10, 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate / (warmup + 1),
        decay_steps=max(steps - warmup, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup,
        alpha=0.1,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, global_clipnorm=1.0)
    )
    log(f"π0 with {model.count_params():,} parameters")
    held_out_loss = _held_out_loss_fn(model, test_x, test_y, noise, time_)
    loss_before = held_out_loss()
    error_before = _action_error(_sample(model, test_x, noise), test_y)
    log(f"held-out flow-matching loss before training: {loss_before:.4f}")

    # === Training ===
    with warnings.catch_warnings():
        # The last VLM layer's feed-forward and final norm do not reach the
        # action expert (as in openpi), so they get no gradient; Keras warns.
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        model.fit(train_x, train_y, batch_size=batch_size, epochs=1, shuffle=True, verbose=verbose)
    loss_after = held_out_loss()
    log(f"held-out flow-matching loss after {steps} steps: {loss_after:.4f}")

    # === Save, reload, sample ===
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    model.save(output)
    reloaded = keras.saving.load_model(output)
    reloaded_loss = _held_out_loss_fn(reloaded, test_x, test_y, noise, time_)()
    sampled = _sample(reloaded, test_x, noise)
    error_after = _action_error(sampled, test_y)
    width = len(STATE_NAMES)
    hold_still = test_x["state"][:, None, :width]
    hold_error = float(np.mean(np.abs(hold_still - test_y[..., :width])))
    seconds = time.perf_counter() - start
    log(f"saved {output} and reloaded it (held-out loss {reloaded_loss:.4f})")
    log(
        f"sampled actions ({NUM_SAMPLING_STEPS} Euler steps) vs the expert's: mean abs error "
        f"{error_after:.4f} (untrained {error_before:.4f}; a robot that holds still scores "
        f"{hold_error:.4f}: a few dozen steps teach the flow, not yet the task)"
    )
    log(f"done in {seconds:.0f} s: loss {loss_before:.4f} -> {loss_after:.4f}; model at {output}")
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "reloaded_loss": reloaded_loss,
        "action_error_before": error_before,
        "action_error_after": error_after,
        "hold_still_error": hold_error,
        "sampled_actions": sampled,
        "output": output,
        "num_parameters": model.count_params(),
        "seconds": seconds,
    }
