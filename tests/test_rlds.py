"""RLDS / TFDS datasets: array_record (random access) and tfrecord (streaming) builders on disk."""

import numpy as np
import pytest

from keras_openpi import cli
from keras_openpi.data.loader import DataLoader
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.rlds import RldsDataset
from keras_openpi.data.sources import detect_source_kind

LENGTHS = (3, 5, 4)
HORIZON = 3
KEYS = {
    "observation/image": "observation/image",
    "observation/state": ["observation/joint_position", "observation/gripper_position"],
    "actions": "action",
}


def _image(episode, step):
    rng = np.random.default_rng([episode, step])
    return rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _episodes(nan_action=None):
    """The toy episodes; `nan_action=(episode, step, dim)` puts a NaN into one action."""
    for e, length in enumerate(LENGTHS):
        steps = [
            {
                "observation": {
                    "image": _image(e, t),
                    "joint_position": np.full(2, 10 * e + t, np.float32),
                    "gripper_position": np.array([-t], np.float32),
                },
                "action": np.array([e, t, 100 * e + t], np.float32),
                "language_instruction": f"task {e}",
                "language_instruction_2": "" if e == 1 else f"other {e}",
                "is_first": t == 0,
                "is_last": t == length - 1,
            }
            for t in range(length)
        ]
        if nan_action is not None and nan_action[0] == e:
            steps[nan_action[1]]["action"][nan_action[2]] = np.nan
        yield (
            e,
            {
                "steps": steps,
                "episode_metadata": {
                    "file_path": f"/data/{'failure' if e == 2 else 'success'}/{e}"
                },
            },
        )


def _write_builders(tmp_path_factory, episodes):
    """The episodes as `toy_robot` 1.0.0 in array_record and tfrecord: `{format: data_dir}`."""
    import tensorflow_datasets as tfds

    episodes = list(episodes)

    features = tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": {
                        "image": tfds.features.Image(shape=(16, 16, 3), encoding_format="png"),
                        "joint_position": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                        "gripper_position": tfds.features.Tensor(shape=(1,), dtype=np.float32),
                    },
                    "action": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    "language_instruction": tfds.features.Text(),
                    "language_instruction_2": tfds.features.Text(),
                    "is_first": np.bool_,
                    "is_last": np.bool_,
                }
            ),
            "episode_metadata": {"file_path": tfds.features.Text()},
        }
    )
    roots = {}
    for file_format in ("array_record", "tfrecord"):
        data_dir = tmp_path_factory.mktemp(file_format)
        tfds.dataset_builders.store_as_tfds_dataset(
            name="toy_robot",
            version="1.0.0",
            features=features,
            split_datasets={"train": list(episodes)},
            data_dir=data_dir,
            file_format=file_format,
            disable_shuffling=True,
        )
        roots[file_format] = data_dir
    return roots


@pytest.fixture(scope="module")
def builders(tmp_path_factory):
    return _write_builders(tmp_path_factory, _episodes())


def _open(root, **options):
    return RldsDataset(
        root,
        name="toy_robot",
        keys=KEYS,
        prompt="language_instruction",
        action_horizon=HORIZON,
        **options,
    )


def test_array_record_has_random_access_with_chunks(builders):
    data = _open(builders["array_record"])
    assert data.random_access and data.file_format == "array_record" and len(data) == sum(LENGTHS)
    sample = data[LENGTHS[0] + 1]  # episode 1, step 1
    np.testing.assert_array_equal(sample["observation/image"], _image(1, 1))
    np.testing.assert_array_equal(sample["observation/state"], [11, 11, -1])
    np.testing.assert_array_equal(sample["actions"][:, 1], [1, 2, 3])
    assert sample["actions_is_pad"].tolist() == [False, False, False]
    assert sample["prompt"] == "task 1"
    end = data[LENGTHS[0] + LENGTHS[1] - 1]  # episode 1, its last step: repeated
    np.testing.assert_array_equal(end["actions"][:, 1], [4, 4, 4])
    assert end["actions_is_pad"].tolist() == [False, True, True]
    assert end["episode_index"] == 1 and end["frame_index"] == 4


def test_tfrecord_streams_the_same_frames(builders):
    streamed = _open(builders["tfrecord"])
    assert not streamed.random_access
    with pytest.raises(TypeError, match="only array_record datasets have random access"):
        len(streamed)
    indexed = _open(builders["array_record"])
    frames = list(streamed.iterate())
    assert len(frames) == sum(LENGTHS)
    for index, frame in enumerate(frames):
        expected = indexed[index]
        assert sorted(frame) == sorted(expected)
        for key in ("observation/image", "observation/state", "actions", "actions_is_pad"):
            np.testing.assert_array_equal(frame[key], expected[key])
        assert frame["prompt"] == expected["prompt"]
    shuffled = [
        int(f["actions"][0, 2]) for f in streamed.iterate(shuffle=True, seed=1, buffer_size=5)
    ]
    assert sorted(shuffled) == sorted(int(f["actions"][0, 2]) for f in frames)
    assert shuffled != [int(f["actions"][0, 2]) for f in frames]


def test_prompt_choice_filter_and_errors(builders):
    data = RldsDataset(
        builders["array_record"],
        name="toy_robot",
        keys={"actions": "action"},
        prompt=["language_instruction", "language_instruction_2"],
        episode_filter=lambda metadata: b"success" in metadata["file_path"],
    )
    assert len(data) == LENGTHS[0] + LENGTHS[1]
    prompts = {data[i]["prompt"] for i in range(len(data))}
    assert prompts == {"task 0", "other 0", "task 1"}  # episode 1's second instruction is empty
    with pytest.raises(
        ValueError, match=r"the steps have no feature 'observation/depth'; they have \["
    ):
        RldsDataset(builders["array_record"], name="toy_robot", keys={"depth": "observation/depth"})
    with pytest.raises(FileNotFoundError, match="no TFDS dataset at"):
        RldsDataset(builders["array_record"], name="other", keys=KEYS)
    with pytest.raises(ValueError, match="chunk key 'actions' is not among the keys"):
        RldsDataset(
            builders["array_record"], name="toy_robot", keys={"a": "action"}, action_horizon=2
        )


def test_tensorflow_sees_no_accelerator(builders):
    import tensorflow as tf

    _open(builders["tfrecord"])
    assert tf.config.get_visible_devices("GPU") == []


def test_loader_batches_both_formats(builders):
    indexed = DataLoader(_open(builders["array_record"]), 4, seed=0, model_inputs=False, workers=2)
    batch = indexed[1]
    assert batch["observation/image"].shape == (4, 16, 16, 3)
    assert batch["actions"].shape == (4, HORIZON, 3) and batch["prompt"].shape == (4,)
    stream = DataLoader(_open(builders["tfrecord"]), 4, seed=0, model_inputs=False, workers=2)
    batches = [b["actions"] for _, b in zip(range(4), stream)]
    resumed = DataLoader(_open(builders["tfrecord"]), 4, seed=0, model_inputs=False)
    resumed.restore({"next_batch": 2})
    for expected, (_, again) in zip(batches[2:], zip(range(2), resumed)):
        np.testing.assert_array_equal(again["actions"], expected)


def test_norm_stats_command_on_rlds(builders, tmp_path):
    root = builders["array_record"] / "toy_robot" / "1.0.0"
    assert detect_source_kind(root) == "rlds"
    output = tmp_path / "norm_stats.json"
    args = ["norm-stats", str(root), "--output", str(output)]
    args += [
        "--keys",
        "state=observation/joint_position+observation/gripper_position",
        "actions=action",
    ]
    assert cli.main(args) == 0
    stats = load_norm_stats(output)
    states = np.array(
        [[10 * e + t, 10 * e + t, -t] for e, length in enumerate(LENGTHS) for t in range(length)],
        np.float64,
    )
    np.testing.assert_allclose(stats["state"].mean, states.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["state"].std, states.std(0), rtol=1e-5)
    assert stats["actions"].dim == 3


def test_nan_in_an_episode_names_episode_step_and_feature(tmp_path_factory, tmp_path, capsys):
    roots = _write_builders(tmp_path_factory, _episodes(nan_action=(1, 2, 1)))
    builder = roots["array_record"] / "toy_robot" / "1.0.0"
    expected = f"{builder} split 'train': episode 1 step 2 'action' holds nan at dimension 1"
    data = _open(roots["array_record"])
    data[0]  # episode 0 is clean
    with pytest.raises(ValueError, match=expected):
        data[LENGTHS[0]]  # any step of episode 1: the episode is checked when read
    streamed = _open(roots["tfrecord"])
    with pytest.raises(ValueError, match="episode 1 step 2 'action' holds nan at dimension 1"):
        list(streamed.iterate())
    output = tmp_path / "norm_stats.json"
    capsys.readouterr()  # the builders' progress bars
    assert cli.main(["norm-stats", str(builder), "--output", str(output), "--keys",
                     "actions=action"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and not output.exists()
