"""`keras-openpi demo`: train a small π0 on the procedural reach task, save, reload, sample.

Everything is generated here: no download, no dataset, no tokenizer file.
The model is π0 with small dimensions; the flow is the real one (openpi's
flow-matching loss under `model.fit`, a `.keras` file, Euler sampling), and so
is the data pipeline: delta actions on x, y (`DeltaActions`), z-scored state
and actions (`NormStats`, `Normalize`, `Unnormalize`), zero-padding.
The demo ends by comparing the reloaded model's sampled actions on held-out
episodes with a robot that holds still.
"""

import os
import time
import warnings

import numpy as np

from keras_openpi.data.normalize import NormStats
from keras_openpi.data.procedural import CAMERAS
from keras_openpi.data.procedural import STATE_NAMES
from keras_openpi.data.procedural_source import ProceduralDataset
from keras_openpi.data.transforms import AbsoluteActions
from keras_openpi.data.transforms import DeltaActions
from keras_openpi.data.transforms import Normalize
from keras_openpi.data.transforms import PadStatesAndActions
from keras_openpi.data.transforms import Unnormalize
from keras_openpi.data.transforms import make_bool_mask

# Keras and the model are imported where they are used: `keras-openpi --help`
# builds this command's parser without them.

HELD_OUT_START = 1_000_000  # episode indices of the held-out split
HELD_OUT_EPISODES = 16
NUM_SAMPLING_STEPS = 10
NUM_OBJECTS = 1  # the shape on the table (the prompt still names it)
FRAME_STRIDE = 4  # every 4th frame of an episode: 4x more scenes for the same steps
DEFAULT_STEPS = 1000
DELTA_MASK = make_bool_mask(2, -1)  # x, y relative to the state; gripper absolute
# The demo's π0 is `DEMO_MODEL` seeing 48x48 images in 8x8 patches (36 tokens a camera).
DEMO_IMAGE_RESOLUTION = (48, 48)
DEMO_PATCH_SIZE = 8


def _demo_model(base):
    """`base` (`DEMO_MODEL`) with the demo's image size and patch size."""
    vision = dict(base["vision_variant"], patch_size=DEMO_PATCH_SIZE)
    return dict(base, image_resolution=DEMO_IMAGE_RESOLUTION, vision_variant=vision)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="train a small π0 on a generated reach task, save it as .keras, reload and sample",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"training steps (default {DEFAULT_STEPS})",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument(
        "--output",
        default=os.path.join("outputs", "demo_pi0.keras"),
        help="the .keras file to write (default outputs/demo_pi0.keras)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data, init and noise seed")
    return parser


def run(args):
    run_demo(steps=args.steps, batch_size=args.batch_size, output=args.output, seed=args.seed)
    return 0


def _frames(dataset, indices, tokenizer, config):
    """Frames `indices` of a `ProceduralDataset` as one raw batch (unpadded state and actions)."""
    samples = [dataset[int(i)] for i in indices]
    tokens, token_mask = tokenizer.tokenize_batch([s["prompt"] for s in samples])
    cameras = config.get("image_keys", CAMERAS)
    observation = {
        "image": {c: np.stack([s["image"][c] for s in samples]) for c in cameras},
        "image_mask": {c: np.ones((len(samples),), bool) for c in cameras},
        "state": np.stack([s["state"] for s in samples]),
        "tokenized_prompt": tokens,
        "tokenized_prompt_mask": token_mask,
    }
    return observation, np.stack([s["actions"] for s in samples])


def _training_data(steps, batch_size, seed, tokenizer, config):
    """`steps * batch_size` frames: every `FRAME_STRIDE`-th frame of as many episodes as needed."""
    needed = steps * batch_size
    num_episodes = 1 + needed * FRAME_STRIDE // 12  # episodes average about 12 frames
    while True:
        dataset = ProceduralDataset(
            num_episodes,
            seed,
            image_size=config["image_resolution"][0],
            action_horizon=config["action_horizon"],
            num_objects=NUM_OBJECTS,
        )
        indices = np.arange(0, len(dataset), FRAME_STRIDE)[:needed]
        if len(indices) == needed:
            break
        num_episodes += num_episodes // 4 + 1
    used = int(dataset[int(indices[-1])]["episode_index"]) + 1
    return (*_frames(dataset, indices, tokenizer, config), used)


def _held_out_data(seed, tokenizer, config):
    """Every frame of `HELD_OUT_EPISODES` episodes no training frame comes from."""
    dataset = ProceduralDataset(
        HELD_OUT_EPISODES,
        seed,
        start=HELD_OUT_START,
        image_size=config["image_resolution"][0],
        action_horizon=config["action_horizon"],
        num_objects=NUM_OBJECTS,
    )
    return (
        *_frames(dataset, range(len(dataset)), tokenizer, config),
        dataset[0]["prompt"],
    )


def _norm_stats(observation, actions):
    """z-score stats of the training state and (delta) actions, per dimension."""
    state = observation["state"]
    deltas = DeltaActions(DELTA_MASK)({"state": state, "actions": actions})["actions"]
    flat = {"state": state, "actions": deltas.reshape(-1, deltas.shape[-1])}
    return {key: NormStats(mean=v.mean(0), std=v.std(0)) for key, v in flat.items()}


def _to_model(observation, actions, norm_stats, action_dim):
    """openpi's training transforms: delta x, y actions, normalization, zero-padding."""
    data = {"state": observation["state"], "actions": actions}
    data = DeltaActions(DELTA_MASK)(data)
    data = Normalize(norm_stats)(data)
    data = PadStatesAndActions(action_dim)(data)
    model_observation = {**observation, "state": data["state"].astype(np.float32)}
    return model_observation, data["actions"].astype(np.float32)


def _to_robot(sampled, state, norm_stats):
    """openpi's output transforms: the model's actions back to absolute (B, H, 3) targets."""
    width = len(STATE_NAMES)
    data = Unnormalize({"actions": norm_stats["actions"]})({"actions": sampled[..., :width]})
    return AbsoluteActions(DELTA_MASK)({"state": state, "actions": data["actions"]})["actions"]


def _held_out_loss_fn(model, observation, actions, noise, time_):
    """A function giving `model`'s mean flow-matching loss with fixed noise and time (compiled once)."""
    from keras_openpi.backend import CompiledProgram

    program = CompiledProgram(model, model.flow_matching_loss)
    return lambda: float(np.mean(np.asarray(program(observation, actions, noise, time_))))


def _action_error(model, observation, noise, state, actions, norm_stats):
    """Mean absolute error of `model`'s sampled actions vs the expert's, in the task's units."""
    sampled = np.asarray(
        model.sample_actions(observation, noise=noise, num_steps=NUM_SAMPLING_STEPS)
    )
    absolute = _to_robot(sampled, state, norm_stats)
    return float(np.mean(np.abs(absolute - actions))), absolute.astype(np.float32)


def run_demo(
    steps=DEFAULT_STEPS,
    batch_size=16,
    output=os.path.join("outputs", "demo_pi0.keras"),
    seed=0,
    learning_rate=1e-2,
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
        model_config: `Pi0` arguments replacing the demo's (`DEMO_MODEL` at
            `DEMO_IMAGE_RESOLUTION` in `DEMO_PATCH_SIZE` patches).
        verbose: `model.fit` verbosity (1: a progress bar).
        log: where the report lines go.

    Returns:
        dict with `loss_before`, `loss_after` (held-out flow-matching loss
        with fixed noise and time), `reloaded_loss` (the same, measured on the
        reloaded model), `action_error_before`, `action_error_after` (mean
        absolute error of sampled actions vs the expert's on the held-out
        frames, in the task's units, by the untrained and the reloaded model),
        `hold_still_error` (the same for a robot that does not move),
        `error_ratio` (`action_error_after / hold_still_error`),
        `sampled_actions` (the reloaded model's held-out actions, absolute,
        (B, H, 3)), `output`, `num_parameters`, `seconds`.

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
    config = {**_demo_model(DEMO_MODEL), **(model_config or {})}
    keras.utils.set_random_seed(seed)
    tokenizer = ByteTokenizer(config["max_token_len"])

    # === Data ===
    train_x, train_y, num_episodes = _training_data(steps, batch_size, seed, tokenizer, config)
    test_x, test_y, prompt = _held_out_data(seed, tokenizer, config)
    norm_stats = _norm_stats(train_x, train_y)
    train_x, train_y = _to_model(train_x, train_y, norm_stats, config["action_dim"])
    test_state = test_x["state"]
    test_x, test_model_y = _to_model(test_x, test_y, norm_stats, config["action_dim"])
    rng = np.random.default_rng([seed, HELD_OUT_START])
    noise = rng.standard_normal(test_model_y.shape).astype(np.float32)
    time_ = (rng.beta(1.5, 1.0, size=len(test_y)) * 0.999 + 0.001).astype(np.float32)
    log(
        f"reach task: {len(train_y)} training frames from {num_episodes} episodes, "
        f"{len(test_y)} held-out frames from {HELD_OUT_EPISODES} others; e.g. {prompt!r}"
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
    held_out_loss = _held_out_loss_fn(model, test_x, test_model_y, noise, time_)
    loss_before = held_out_loss()
    error_before, _ = _action_error(model, test_x, noise, test_state, test_y, norm_stats)
    log(f"held-out flow-matching loss before training: {loss_before:.4f}")

    # === Training ===
    with warnings.catch_warnings():
        # The last VLM layer's feed-forward and final norm do not reach the
        # action expert (as in openpi), so they get no gradient; Keras warns.
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        model.fit(
            train_x,
            train_y,
            batch_size=batch_size,
            epochs=1,
            shuffle=True,
            verbose=verbose,
        )
    loss_after = held_out_loss()
    log(f"held-out flow-matching loss after {steps} steps: {loss_after:.4f}")

    # === Save, reload, sample ===
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    model.save(output)
    reloaded = keras.saving.load_model(output)
    reloaded_loss = _held_out_loss_fn(reloaded, test_x, test_model_y, noise, time_)()
    error_after, sampled = _action_error(reloaded, test_x, noise, test_state, test_y, norm_stats)
    hold_error = float(np.mean(np.abs(test_state[:, None, :] - test_y)))
    ratio = error_after / hold_error
    seconds = time.perf_counter() - start
    log(f"saved {output} and reloaded it (held-out loss {reloaded_loss:.4f})")
    log(
        f"held-out sampled actions ({NUM_SAMPLING_STEPS} Euler steps) vs the expert's: mean abs "
        f"error {error_after:.4f} (untrained {error_before:.4f}); a robot that holds still: "
        f"{hold_error:.4f}. The policy's error is {ratio:.2f}x holding still's "
        f"({abs(1 - ratio):.0%} {'lower' if ratio < 1 else 'higher'})"
    )
    log(f"done in {seconds:.0f} s: loss {loss_before:.4f} -> {loss_after:.4f}; model at {output}")
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "reloaded_loss": reloaded_loss,
        "action_error_before": error_before,
        "action_error_after": error_after,
        "hold_still_error": hold_error,
        "error_ratio": ratio,
        "sampled_actions": sampled,
        "output": output,
        "num_parameters": model.count_params(),
        "seconds": seconds,
    }
