"""LeRobot datasets: the v2.1 writer, the v2.1 / v3.0 reader, action chunks, prompts, norm stats."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from keras_openpi import cli
from keras_openpi.data.lerobot import LeRobotDataset
from keras_openpi.data.lerobot_writer import LeRobotWriter
from keras_openpi.data.lerobot_writer import episodes_from_frames
from keras_openpi.data.lerobot_writer import write_lerobot_dataset
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.pipeline import build_transforms
from keras_openpi.data.procedural import CAMERAS
from keras_openpi.data.procedural_source import LEROBOT_REPACK
from keras_openpi.data.procedural_source import ProceduralDataset
from keras_openpi.data.robots import get_robot
from keras_openpi.data.transforms import Group
from keras_openpi.data.transforms import Repack
from lerobot_support import write_v3

HORIZON = 4
IMAGE_SIZE = 64
NUM_EPISODES = 3


@pytest.fixture(scope="module")
def source():
    return ProceduralDataset(NUM_EPISODES, seed=0, image_size=IMAGE_SIZE, action_horizon=HORIZON)


@pytest.fixture(scope="module")
def episodes(source):
    return list(source.lerobot_episodes())


@pytest.fixture(scope="module")
def v21_root(tmp_path_factory, episodes):
    return write_lerobot_dataset(tmp_path_factory.mktemp("v21") / "reach", episodes, fps=10)


@pytest.fixture(scope="module")
def v3_root(tmp_path_factory, episodes):
    return write_v3(tmp_path_factory.mktemp("v3") / "reach", episodes, episodes_per_file=2)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def test_writer_writes_the_v21_layout(v21_root, episodes):
    info = json.loads((v21_root / "meta/info.json").read_text())
    lengths = [len(e["action"]) for e in episodes]
    assert info["codebase_version"] == "v2.1"
    assert info["total_episodes"] == NUM_EPISODES and info["total_frames"] == sum(lengths)
    assert info["total_videos"] == NUM_EPISODES * len(CAMERAS) and info["total_chunks"] == 1
    assert info["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    camera = info["features"]["observation.images.base_0_rgb"]
    assert camera["dtype"] == "video" and camera["shape"] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert camera["info"]["video.codec"] == "av1" and camera["info"]["video.pix_fmt"] == "yuv420p"
    assert info["features"]["observation.state"] == {
        "dtype": "float32",
        "shape": [3],
        "names": None,
    }
    assert info["features"]["index"]["dtype"] == "int64"
    episode_lines = (v21_root / "meta/episodes.jsonl").read_text().splitlines()
    assert [json.loads(line)["length"] for line in episode_lines] == lengths
    tasks = [json.loads(line) for line in (v21_root / "meta/tasks.jsonl").read_text().splitlines()]
    assert [t["task"] for t in tasks] == list(dict.fromkeys(e["task"] for e in episodes))
    assert len((v21_root / "meta/episodes_stats.jsonl").read_text().splitlines()) == NUM_EPISODES
    stats = json.loads((v21_root / "meta/stats.json").read_text())
    states = np.concatenate([e["observation.state"] for e in episodes])
    np.testing.assert_allclose(stats["observation.state"]["mean"], states.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["observation.state"]["std"], states.std(0), rtol=1e-5)
    assert np.shape(stats["observation.images.base_0_rgb"]["mean"]) == (3, 1, 1)
    table = pq.read_table(v21_root / "data/chunk-000/episode_000001.parquet")
    assert table.column_names == [
        "observation.state",
        "action",
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    ]
    assert table.column("index").to_pylist()[0] == lengths[0]
    np.testing.assert_allclose(
        table.column("timestamp").to_numpy(), np.arange(lengths[1]) / 10, atol=1e-6
    )
    for camera in CAMERAS:
        assert (
            v21_root / f"videos/chunk-000/observation.images.{camera}/episode_000002.mp4"
        ).is_file()
    assert not v21_root.with_name("reach.partial").exists()


def test_v21_round_trip_frames_actions_and_video(v21_root, source):
    data = LeRobotDataset(v21_root, action_horizon=HORIZON, prompt_from_task=True)
    assert len(data) == len(source) and data.fps == 10
    errors, psnr = [], []
    for index in range(len(data)):
        sample, expected = data[index], source[index]
        np.testing.assert_array_equal(sample["observation.state"], expected["state"])
        np.testing.assert_array_equal(sample["action"], expected["actions"])
        np.testing.assert_array_equal(sample["action_is_pad"], expected["actions_is_pad"])
        assert sample["prompt"] == sample["task"] == expected["prompt"]
        for camera in CAMERAS:
            image = sample[f"observation.images.{camera}"]
            assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
            errors.append(np.abs(image.astype(int) - expected["image"][camera]).mean())
            psnr.append(_psnr(image, expected["image"][camera]))
    # LeRobot's AV1 settings (crf 30, yuv420p) on sharp synthetic 64x64 shapes, measured:
    # mean |error| 3.2 / 255 (worst frame 7.7), PSNR 31.9 dB on average (worst frame 24.7 dB).
    assert np.mean(errors) < 4.5 and np.max(errors) < 10.0
    assert np.mean(psnr) > 28.0 and np.min(psnr) > 22.0


def test_images_stored_in_parquet_round_trip_exactly(tmp_path, episodes, source):
    root = write_lerobot_dataset(tmp_path / "png", episodes[:2], fps=10, use_videos=False)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["video_path"] is None
    assert info["features"]["observation.images.base_0_rgb"]["dtype"] == "image"
    data = LeRobotDataset(root)
    for index in (0, 5, len(data) - 1):
        for camera in CAMERAS:
            np.testing.assert_array_equal(
                data[index][f"observation.images.{camera}"], source[index]["image"][camera]
            )


def test_action_chunks_clamp_to_the_episode_and_flag_padding(v21_root, episodes):
    data = LeRobotDataset(v21_root, delta_timestamps={"action": [-0.2, -0.1, 0.0, 0.1, 0.2]})
    first_length = len(episodes[0]["action"])
    actions = episodes[0]["action"]
    start = data[0]  # the episode's first frame: the past clamps to it
    np.testing.assert_array_equal(start["action"], actions[[0, 0, 0, 1, 2]])
    assert start["action_is_pad"].tolist() == [True, True, False, False, False]
    last = data[first_length - 1]  # its last frame: the future repeats the last action
    np.testing.assert_array_equal(last["action"], actions[[-3, -2, -1, -1, -1]])
    assert last["action_is_pad"].tolist() == [False, False, False, True, True]
    following = data[first_length]  # the next episode's first frame never sees the previous one
    assert following["episode_index"] == 1 and following["frame_index"] == 0
    np.testing.assert_array_equal(following["action"][:3], episodes[1]["action"][[0, 0, 0]])
    video_chunk = LeRobotDataset(
        v21_root, delta_timestamps={"observation.images.base_0_rgb": [0.0, 0.1]}
    )[first_length - 1]["observation.images.base_0_rgb"]
    assert video_chunk.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(video_chunk[0], video_chunk[1])
    with pytest.raises(
        ValueError, match=r"delta_timestamps\['action'\] must be multiples of 1/fps"
    ):
        LeRobotDataset(v21_root, delta_timestamps={"action": [0.0, 0.05]})


def test_v3_reader_matches_the_source(v3_root, source, v21_root):
    data = LeRobotDataset(v3_root, action_horizon=HORIZON, prompt_from_task=True)
    assert data.meta.version == "v3.0" and len(data) == len(source)
    assert [e.data_path for e in data.meta.episodes] == [
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-001.parquet",
    ]
    second = data.meta.episodes[1]
    assert second.videos["observation.images.base_0_rgb"][1] == pytest.approx(
        data.meta.episodes[0].length / 10
    )
    errors = []
    for index in range(len(data)):
        sample, expected = data[index], source[index]
        np.testing.assert_array_equal(sample["observation.state"], expected["state"])
        np.testing.assert_array_equal(sample["action"], expected["actions"])
        np.testing.assert_array_equal(sample["action_is_pad"], expected["actions_is_pad"])
        assert sample["prompt"] == expected["prompt"]
        image = sample["observation.images.left_wrist_0_rgb"]
        errors.append(np.abs(image.astype(int) - expected["image"]["left_wrist_0_rgb"]).mean())
    assert np.mean(errors) < 4.5 and np.max(errors) < 10.0
    # v3 -> v2.1 through the writer: same frames.
    exported = LeRobotDataset(
        write_lerobot_dataset(
            v21_root.parent / "from_v3", (data.episode(i) for i in range(3)), fps=10
        )
    )
    np.testing.assert_array_equal(exported.column("action"), data.column("action"))


def test_prompt_from_task_feeds_the_robot_transforms(v21_root):
    data = LeRobotDataset(v21_root, action_horizon=HORIZON, prompt_from_task=True)
    group = build_transforms(
        robot=get_robot("raw"), model=Group(), repack=Group([Repack(LEROBOT_REPACK)])
    )
    sample = data[7]
    out = sample
    for transform in group.inputs:
        out = transform(out)
    assert sorted(out) == ["actions", "image", "image_mask", "prompt", "state"]
    assert out["prompt"] == sample["task"] and out["actions"].shape == (HORIZON, 3)
    assert sorted(out["image"]) == sorted(CAMERAS)
    assert "prompt" not in LeRobotDataset(v21_root)[7]


def test_selection_and_errors(v21_root, tmp_path, episodes):
    data = LeRobotDataset(v21_root, episodes=[2], keys=["observation.state"])
    assert len(data) == len(episodes[2]["action"])
    assert sorted(data[0]) == sorted(
        [
            "observation.state",
            "timestamp",
            "frame_index",
            "episode_index",
            "index",
            "task_index",
            "task",
        ]
    )
    assert data[0]["episode_index"] == 2
    with pytest.raises(ValueError, match="no feature 'observation.images.top'"):
        LeRobotDataset(v21_root, keys=["observation.images.top"])
    with pytest.raises(ValueError, match="no episode 7"):
        LeRobotDataset(v21_root, episodes=[7])
    with pytest.raises(FileNotFoundError, match="no LeRobot dataset at"):
        LeRobotDataset(tmp_path / "missing")
    old = tmp_path / "old"
    (old / "meta").mkdir(parents=True)
    (old / "meta/info.json").write_text(
        json.dumps({"codebase_version": "v1.6", "fps": 10, "features": {}, "data_path": "x"})
    )
    with pytest.raises(ValueError, match="LeRobot format 'v1.6' is not supported"):
        LeRobotDataset(old)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        LeRobotWriter(v21_root, fps=10)
    writer = LeRobotWriter(tmp_path / "bad", fps=10)
    writer.add_episode({"observation.state": np.zeros((3, 2), np.float32), "task": "a"})
    with pytest.raises(ValueError, match=r"'observation.state' has frames of shape \(4,\)"):
        writer.add_episode({"observation.state": np.zeros((3, 4), np.float32), "task": "a"})


def test_episodes_from_frames_groups_consecutive_frames():
    frames = [
        {"episode_index": e, "task": f"t{e}", "state": np.full(2, t, np.float32)}
        for e, length in ((0, 3), (1, 2))
        for t in range(length)
    ]
    episodes = list(episodes_from_frames(frames))
    assert [e["state"].shape for e in episodes] == [(3, 2), (2, 2)]
    assert episodes[1]["task"] == ["t1", "t1"]


def test_norm_stats_command_on_a_lerobot_dataset(v21_root, episodes, tmp_path):
    output = tmp_path / "assets"
    args = ["norm-stats", str(v21_root), "--output", str(output), "--action-horizon", str(HORIZON)]
    args += ["--keys", "state=observation.state", "actions=action"]
    assert cli.main(args) == 0
    stats = load_norm_stats(output)
    states = np.concatenate([e["observation.state"] for e in episodes]).astype(np.float64)
    chunks = np.concatenate(
        [
            e["action"][
                np.minimum(
                    np.arange(len(e["action"]))[:, None] + np.arange(HORIZON), len(e["action"]) - 1
                )
            ]
            for e in episodes
        ]
    ).reshape(-1, 3)
    np.testing.assert_allclose(stats["state"].mean, states.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["actions"].mean, chunks.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["actions"].std, chunks.std(0), rtol=1e-5)
    assert np.all(np.abs(stats["actions"].q99 - np.quantile(chunks, 0.99, axis=0)) <= 1e-3)
