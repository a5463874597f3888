"""`Policy`: transforms around the sampler, checks, norm stats, checkpoints, recording."""

import numpy as np
import pytest
from serving_support import STATE_DIM
from serving_support import make_request
from serving_support import tiny_pi0
from serving_support import write_norm_stats

from keras_openpi import Policy
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.robots.droid import make_droid_example
from keras_openpi.data.robots.libero import make_libero_example
from keras_openpi.serving import PolicyRecorder
from keras_openpi.serving.checkpoint import resolve_norm_stats
from keras_openpi.serving.prompt import resolve_tokenizer
from keras_openpi.serving.robots import robot_transforms
from keras_openpi.tokenizers import ByteTokenizer

HORIZON, ACTION_DIM = 4, 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "tiny.keras"
    tiny_pi0().save(path)
    return path


@pytest.fixture(scope="module")
def policy(model_path):
    return Policy.from_checkpoint(model_path, seed=0)


def policy_for(model, robot="raw", seed=None, fixed_noise=False, **transform_args):
    """A policy around an already compiled model (no reload, no recompilation)."""
    transform_args.setdefault("tokenizer", resolve_tokenizer(None, model))
    inputs, outputs = robot_transforms(robot, model, **transform_args)
    return Policy(
        model,
        transforms=inputs,
        output_transforms=outputs,
        seed=seed,
        fixed_noise=fixed_noise,
        warmup=False,
    )


def noise(seed, batch=None):
    shape = (HORIZON, ACTION_DIM) if batch is None else (batch, HORIZON, ACTION_DIM)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def model_batch(request, max_len=16):
    """The request in the model's own layout, built by hand (batch of one)."""
    ids, mask = ByteTokenizer(max_len).tokenize(request["prompt"])
    state = np.zeros((1, ACTION_DIM), np.float32)
    state[0, :STATE_DIM] = request["state"]
    return {
        "image": {
            k: v[None].astype(np.float32) / 255.0 * 2.0 - 1.0 for k, v in request["image"].items()
        },
        "image_mask": {k: np.ones((1,), bool) for k in request["image"]},
        "state": state,
        "tokenized_prompt": ids[None],
        "tokenized_prompt_mask": mask[None],
    }


def test_infer_returns_actions_and_timing(policy):
    result = policy.infer(make_request(0))
    assert sorted(result) == ["actions", "policy_timing"]
    assert result["actions"].shape == (HORIZON, ACTION_DIM)
    assert result["actions"].dtype == np.float32
    assert sorted(result["policy_timing"]) == ["infer_ms"]
    assert result["policy_timing"]["infer_ms"] > 0.0
    assert policy.metadata == {"robot": "raw", "model_type": "pi0", "action_horizon": HORIZON}
    assert policy.warmup_seconds > 0.0


def test_sampler_is_compiled_once_at_warmup(policy):
    program = policy.model._sample_program._jitted
    compiled = program._cache_size()
    for seed in range(3):
        policy.infer(make_request(seed, prompt="x" * seed))
    policy.infer({**make_request(1), "state": np.ones(2, np.float32)})
    assert program._cache_size() == compiled == 1


def test_actions_equal_the_models_own_sampling(policy):
    request = make_request(3)
    expected = policy.model.sample_actions(model_batch(request), noise=noise(1)[None], num_steps=10)
    actual = policy.infer(request, noise=noise(1))["actions"]
    np.testing.assert_allclose(actual, np.asarray(expected)[0], atol=1e-6)


def test_batch_equals_single_observations(policy):
    requests = [make_request(1), make_request(2)]
    batch = policy.infer_batch(requests, noise=noise(5, batch=2))
    assert batch["actions"].shape == (2, HORIZON, ACTION_DIM)
    assert batch["policy_timing"]["batch_size"] == 2
    for i, request in enumerate(requests):
        single = policy.infer(request, noise=noise(5, batch=2)[i])["actions"]
        np.testing.assert_allclose(batch["actions"][i], single, atol=1e-5)


def test_noise_stream_and_fixed_noise(policy):
    request = make_request(0)
    first, second = (policy.infer(request)["actions"] for _ in range(2))
    assert np.abs(first - second).max() > 1e-3  # fresh noise each call
    fixed = policy_for(policy.model, seed=7, fixed_noise=True)
    np.testing.assert_array_equal(fixed.infer(request)["actions"], fixed.infer(request)["actions"])
    np.testing.assert_allclose(
        fixed.infer(request)["actions"],
        policy.infer(request, noise=noise_from_seed(7))["actions"],
        atol=1e-6,
    )


def noise_from_seed(seed):
    return np.random.default_rng(seed).standard_normal((1, HORIZON, ACTION_DIM), dtype=np.float32)[
        0
    ]


def test_tokenized_prompt_and_default_prompt(policy):
    request = make_request(2, prompt="wave")
    as_array = {**request, "prompt": np.array("wave")}  # openpi accepts a 0-d str array too
    np.testing.assert_allclose(
        policy.infer(as_array, noise=noise(0))["actions"],
        policy.infer(request, noise=noise(0))["actions"],
        atol=1e-6,
    )
    ids, mask = ByteTokenizer(16).tokenize("wave")
    tokenized = {k: v for k, v in request.items() if k != "prompt"}
    tokenized.update(tokenized_prompt=ids[:6], tokenized_prompt_mask=mask[:6])
    expected = policy.infer(request, noise=noise(0))["actions"]
    np.testing.assert_allclose(
        policy.infer(tokenized, noise=noise(0))["actions"], expected, atol=1e-6
    )
    defaulted = policy_for(policy.model, default_prompt="wave")
    no_prompt = make_request(2, prompt=None)
    np.testing.assert_allclose(
        defaulted.infer(no_prompt, noise=noise(0))["actions"], expected, atol=1e-6
    )


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda r: "not a dict", "an observation must be a dict of named arrays, got str"),
        (
            lambda r: {k: v for k, v in r.items() if k != "state"},
            "RawInputs: the sample has no 'state'",
        ),
        (
            lambda r: {**r, "state": np.array([0.0, np.nan, 1.0])},
            r"'state' has a non-finite value \(nan\) at index \(1,\)",
        ),
        (
            lambda r: {**r, "state": np.full(3, np.inf, np.float32)},
            r"'state' has a non-finite value \(inf\)",
        ),
        (
            lambda r: {**r, "state": np.ones(9, np.float32)},
            "'state' has 9 dims, more than the model's action_dim 8",
        ),
        (
            lambda r: {**r, "image": {**r["image"], "base_0_rgb": np.zeros((32, 32, 4), np.uint8)}},
            r"'image/base_0_rgb' must be one RGB image, \(h, w, 3\) or \(3, h, w\), uint8 or "
            r"float in \[0, 1\], got uint8 array of shape \(32, 32, 4\)",
        ),
        (
            lambda r: {**r, "image": {**r["image"], "base_0_rgb": np.zeros((32, 32, 3), np.int64)}},
            r"'image/base_0_rgb' must be one RGB image, .*, got int64 array of shape \(32, 32, 3\)",
        ),
        (
            lambda r: {**r, "image": {"base_0_rgb": r["image"]["base_0_rgb"]}},
            "'image' has no camera 'left_wrist_0_rgb'",
        ),
        (lambda r: {**r, "prompt": 5}, "'prompt' must be a str, got int"),
        (
            lambda r: {k: v for k, v in r.items() if k != "prompt"},
            "the observation has no 'prompt' \\(a str\\) or 'tokenized_prompt'",
        ),
        (
            lambda r: {**r, "tokenized_prompt": np.array([1, 300])},
            r"'tokenized_prompt' ids must be in \[0, 259\), got ids from 1 to 300",
        ),
        (
            lambda r: {**r, "tokenized_prompt": np.ones(17, np.int32)},
            r"'tokenized_prompt' must be a \(l,\) int with l <= 16",
        ),
    ],
    ids=[
        "not_dict",
        "missing_state",
        "nan_state",
        "inf_state",
        "wide_state",
        "image_channels",
        "image_dtype",
        "missing_camera",
        "prompt_type",
        "no_prompt",
        "token_range",
        "token_length",
    ],
)
def test_bad_observations_raise_naming_the_key(policy, change, error):
    with pytest.raises(ValueError, match=error):
        policy.infer(change(make_request(0)))


def test_bad_noise_shape(policy):
    with pytest.raises(
        ValueError, match=r"'noise' must have shape \(H, action_dim\) = \(4, 8\), got \(3, 8\)"
    ):
        policy.infer(make_request(0), noise=np.zeros((3, 8)))
    with pytest.raises(ValueError, match="'observations' must hold at least one observation"):
        policy.infer_batch([])


def test_prompt_without_tokenizer(policy):
    bare = policy_for(policy.model, tokenizer=None)
    with pytest.raises(
        ValueError, match="the observation has a 'prompt' but the server has no tokenizer"
    ):
        bare.infer(make_request(0))


def test_norm_stats_found_next_to_the_checkpoint(tmp_path, model_path, policy):
    path = tmp_path / "model.keras"
    path.write_bytes(model_path.read_bytes())
    write_norm_stats(tmp_path / "assets" / "my_robot")
    normalized = Policy.from_checkpoint(path, warmup=False)
    stats = load_norm_stats(tmp_path / "assets" / "my_robot")["state"]
    request = make_request(4)
    raw = dict(
        request, state=((request["state"] - stats.mean) / (stats.std + 1e-6)).astype(np.float32)
    )
    expected = policy.infer(raw, noise=noise(2))["actions"]
    std = np.concatenate([stats.std, np.ones(ACTION_DIM - STATE_DIM)]) + 1e-6
    mean = np.concatenate([stats.mean, np.zeros(ACTION_DIM - STATE_DIM)])
    np.testing.assert_allclose(
        normalized.infer(request, noise=noise(2))["actions"], expected * std + mean, atol=1e-5
    )
    write_norm_stats(tmp_path / "assets" / "other_robot")
    with pytest.raises(
        ValueError, match="several norm stats files under .*assets.*choose one with --norm-stats"
    ):
        Policy.from_checkpoint(path, warmup=False)
    chosen = tmp_path / "assets" / "other_robot" / "norm_stats.json"
    assert resolve_norm_stats(chosen, [tmp_path / "assets"])[1] == str(chosen)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Policy.from_checkpoint(tmp_path / "missing.keras")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(
        ValueError,
        match=r"is not a checkpoint this version can load; expected one of "
        r"\['.keras file', 'training checkpoint directory'\]",
    ):
        Policy.from_checkpoint(tmp_path / "weights.h5")


@pytest.mark.parametrize(
    "robot, example, action_dim",
    [("libero", make_libero_example, 7), ("droid", make_droid_example, 8)],
)
def test_robot_formats(policy, robot, example, action_dim):
    robot_policy = policy_for(policy.model, robot=robot)
    result = robot_policy.infer(example())  # 224x224 cameras, resized to the model's 32x32
    assert result["actions"].shape == (HORIZON, action_dim)


def test_aloha_needs_a_wide_enough_model(policy):
    from keras_openpi.data.robots.aloha import make_aloha_example

    aloha = policy_for(policy.model, robot="aloha")
    with pytest.raises(ValueError, match="'state' has 14 dims, more than the model's action_dim 8"):
        aloha.infer(make_aloha_example())


def test_recorder_writes_openpi_records(tmp_path, policy):
    request = make_request(1)
    recorder = PolicyRecorder(policy, tmp_path / "records")
    result = recorder.infer(request)
    assert recorder.metadata == policy.metadata
    record = np.load(tmp_path / "records" / "step_0.npy", allow_pickle=True).item()
    assert sorted(record) == [
        "inputs/image/base_0_rgb",
        "inputs/image/left_wrist_0_rgb",
        "inputs/image/right_wrist_0_rgb",
        "inputs/prompt",
        "inputs/state",
        "outputs/actions",
        "outputs/policy_timing/infer_ms",
    ]
    np.testing.assert_array_equal(record["inputs/state"], request["state"])
    np.testing.assert_array_equal(record["outputs/actions"], result["actions"])
    assert record["inputs/prompt"] == "pick cube"
    PolicyRecorder(policy, tmp_path / "records").infer(request)  # a restart keeps numbering
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["step_0.npy", "step_1.npy"]


def test_a_record_that_cannot_be_written_leaves_nothing_half_and_the_reply_goes_out(
    tmp_path, policy, monkeypatch, caplog
):
    import errno

    from keras_openpi.serving import recorder as recorder_module

    def full_disk(file, record):
        file.write(b"\x93NUMPY half a record")
        raise OSError(errno.ENOSPC, "No space left on device")

    recorder = PolicyRecorder(policy, tmp_path / "records")
    monkeypatch.setattr(recorder_module.np, "save", full_disk)
    result = recorder.infer(make_request(1))
    assert result["actions"].shape == (HORIZON, ACTION_DIM)
    assert list((tmp_path / "records").iterdir()) == []
    step = tmp_path / "records" / "step_0.npy"
    assert f"could not record {step} (the reply was sent): [Errno 28] No space left" in caplog.text
    monkeypatch.undo()
    recorder.infer(make_request(1))  # numbering goes on; the record is whole
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["step_1.npy"]
    assert np.load(tmp_path / "records" / "step_1.npy", allow_pickle=True).item()["inputs/prompt"]
