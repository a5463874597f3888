"""Bad data fails while loading, naming the file, episode, frame and key; nothing written half."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keras_openpi import cli
from keras_openpi.data.lerobot import LeRobotDataset
from keras_openpi.data.lerobot_writer import write_lerobot_dataset
from keras_openpi.data.normalize import NormStats
from keras_openpi.data.running_stats import compute_norm_stats
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.normalize import norm_stats_from_json
from keras_openpi.data.npz_source import NpzSamples
from keras_openpi.data.procedural_source import ProceduralDataset

CAMERA = "observation.images.base_0_rgb"


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    """A LeRobot v2.1 dataset of 3 episodes (one parquet file and one video per camera each)."""
    episodes = list(ProceduralDataset(3, seed=0, image_size=32).lerobot_episodes())
    return write_lerobot_dataset(tmp_path_factory.mktemp("clean") / "reach", episodes, fps=10)


@pytest.fixture
def root(tmp_path, clean_root):
    """A copy of the dataset to damage."""
    return shutil.copytree(clean_root, tmp_path / "reach")


def _data_file(root, episode):
    return root / f"data/chunk-000/episode_{episode:06d}.parquet"


def _set_value(root, episode, key, frame, dim, value, dtype=None):
    """Writes `value` into `key[frame, dim]` of an episode's parquet file."""
    path = _data_file(root, episode)
    table = pq.read_table(path)
    rows = np.array(table.column(key).to_pylist(), dtype=dtype or np.float32)
    rows[frame, dim] = value
    column = pa.array(rows.tolist(), pa.list_(pa.from_numpy_dtype(rows.dtype)))
    pq.write_table(table.set_column(table.column_names.index(key), key, column), path)


def _norm_stats_cli(root, output, capsys):
    code = cli.main(
        ["norm-stats", str(root), "--output", str(output), "--keys",
         "state=observation.state", "actions=action", "--action-horizon", "4"]
    )
    err = capsys.readouterr().err.strip()
    return code, err


# === Non-finite values in LeRobot frames ===


def test_nan_action_names_file_episode_frame_and_key(root):
    data_all = LeRobotDataset(root, keys=["action"])
    _set_value(root, 1, "action", frame=5, dim=2, value=np.nan)
    with pytest.raises(ValueError) as error:
        LeRobotDataset(root, action_horizon=4)
    assert str(error.value) == (
        f"{_data_file(root, 1)}: episode 1 frame 5 'action' holds nan at dimension 2 (1 of "
        f"{len(data_all)} frames hold NaN or inf there). Fix the data, or leave those episodes "
        "(episodes=[...]) or that feature (keys=[...]) out."
    )
    data = LeRobotDataset(root, action_horizon=4, episodes=[0, 2])  # the way around
    assert sorted(set(data.column("episode_index").tolist())) == [0, 2]
    with pytest.raises(ValueError, match="episode 1 frame 5 'action' holds nan"):
        LeRobotDataset(root, keys=["action"], episodes=[2, 1, 0])  # any order of episodes


def test_inf_state_and_float32_overflow_are_named(root):
    _set_value(root, 2, "observation.state", frame=0, dim=1, value=-np.inf)
    with pytest.raises(ValueError, match=r"episode 2 frame 0 'observation.state' holds -inf at "
                       "dimension 1"):
        LeRobotDataset(root, keys=["observation.state"])
    _set_value(root, 2, "observation.state", frame=0, dim=1, value=0.0)
    # float64 1e300 in the file is finite, but info.json's float32 makes it inf.
    _set_value(root, 0, "action", frame=3, dim=0, value=1e300, dtype=np.float64)
    with pytest.raises(ValueError, match=r"episode 0 frame 3 'action' holds inf at dimension 0 "
                       r"\(as info.json's float32\)"):
        LeRobotDataset(root, keys=["action"])


def test_norm_stats_command_names_the_nan_and_writes_nothing(root, tmp_path, capsys):
    _set_value(root, 1, "observation.state", frame=7, dim=0, value=np.nan)
    output = tmp_path / "assets" / "norm_stats.json"
    code, err = _norm_stats_cli(root, output, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(
        f"keras-openpi norm-stats: error: {_data_file(root, 1)}: episode 1 frame 7 "
        "'observation.state' holds nan at dimension 0"
    )
    assert not (tmp_path / "assets").exists()


# === Missing and damaged files ===


def test_missing_parquet_file_names_the_episode(root, capsys):
    _data_file(root, 1).unlink()
    with pytest.raises(FileNotFoundError) as error:
        LeRobotDataset(root)
    assert str(error.value) == f"{_data_file(root, 1)} is missing; it holds episode 1 of {root}."


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_damaged_parquet_file_names_the_episode(root, damage, tmp_path, capsys):
    path = _data_file(root, 2)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    else:
        path.write_bytes(np.random.default_rng(0).bytes(len(blob)))
    with pytest.raises(ValueError, match=f"^{path} \\(episode 2 of {root}\\) is not a readable "
                       "parquet file: "):
        LeRobotDataset(root)
    code, err = _norm_stats_cli(root, tmp_path / "stats.json", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "(episode 2 of" in err
    assert not (tmp_path / "stats.json").exists()


def test_parquet_file_with_missing_rows_or_column_is_named(root):
    path = _data_file(root, 0)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 3), path)
    with pytest.raises(ValueError, match=f"{path} holds {table.num_rows - 3} frames but meta/ "
                       f"lists {table.num_rows} for its episode 0: the file is truncated"):
        LeRobotDataset(root)
    pq.write_table(table.drop_columns(["action"]), path)
    with pytest.raises(ValueError, match=f"{path} \\(episode 0 of .*\\) has no column 'action'"):
        LeRobotDataset(root)


def test_missing_or_incomplete_metadata_is_named(root, tmp_path):
    episodes = root / "meta/episodes.jsonl"
    lines = episodes.read_text().splitlines()
    episodes.write_text("\n".join([lines[0], lines[1].replace('"length"', '"frames"'), lines[2]]))
    with pytest.raises(ValueError, match=f"^{episodes} entry 1 has no 'length'; it has \\["):
        LeRobotDataset(root)
    episodes.unlink()
    with pytest.raises(FileNotFoundError, match=f"^{episodes} is missing; a LeRobot dataset "
                       "needs it.$"):
        LeRobotDataset(root)


def test_damaged_v3_metadata_is_named(tmp_path):
    from lerobot_support import write_v3

    episodes = list(ProceduralDataset(2, seed=0, image_size=32).lerobot_episodes())
    root = write_v3(tmp_path / "v3", episodes)
    meta = root / "meta/episodes/chunk-000/file-000.parquet"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"^{meta} is not a readable parquet file: "):
        LeRobotDataset(root)


def test_missing_video_names_the_camera_and_episode(root):
    video = root / f"videos/chunk-000/{CAMERA}/episode_000001.mp4"
    video.unlink()
    with pytest.raises(FileNotFoundError) as error:
        LeRobotDataset(root)
    assert str(error.value) == (
        f"{video} is missing: the '{CAMERA}' video of episode 1 (1 of the 9 videos of the "
        "selected episodes are missing)."
    )
    assert len(LeRobotDataset(root, episodes=[0, 2])) > 0


def test_damaged_video_names_episode_frame_and_camera(root):
    video = root / f"videos/chunk-000/{CAMERA}/episode_000001.mp4"
    video.write_bytes(np.random.default_rng(0).bytes(video.stat().st_size))
    data = LeRobotDataset(root)  # videos are decoded per frame, when read
    first = data.meta.episodes[1].start
    data[first - 1]  # episode 0 reads fine
    with pytest.raises(ValueError, match=f"^episode 1 frame 0 '{CAMERA}': {video}: cannot open "
                       "the video"):
        data[first]


# === Norm stats ===


def test_norm_stats_json_with_nan_names_file_and_key(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(
        '{"norm_stats": {"state": {"mean": [0.0, NaN], "std": [1.0, 1.0]},'
        ' "actions": {"mean": [0.0], "std": [1.0]}}}'
    )
    with pytest.raises(ValueError) as error:
        load_norm_stats(path)
    assert str(error.value) == (
        f"{path}: entry 'state': NormStats 'mean' holds nan at dimension 1: norm stats must be "
        "finite (NaN or infinite values make every normalized value NaN)."
    )
    with pytest.raises(ValueError, match="'std' must be >= 0, got -1.0 at dimension 0"):
        norm_stats_from_json('{"norm_stats": {"a": {"mean": [0.0], "std": [-1.0]}}}')
    with pytest.raises(ValueError, match="'q01' must not exceed 'q99', got 2.0 > 1.0 at dim"):
        NormStats(mean=[0.0], std=[1.0], q01=[2.0], q99=[1.0])


def test_compute_norm_stats_names_the_sample_episode_and_frame():
    samples = [
        {"state": np.zeros(2), "actions": np.full((3, 2), float(i)), "episode_index": np.int64(4),
         "frame_index": np.int64(i)}
        for i in range(5)
    ]
    samples[3]["actions"][1, 0] = np.inf
    with pytest.raises(ValueError) as error:
        compute_norm_stats(samples)
    assert str(error.value) == (
        "sample 3 (episode 4, frame 3): 'actions' holds inf at index (1, 0); norm stats need "
        "finite values (fix the data, or leave those frames out)."
    )
    batch = {  # a loader's stacked batch: the row gives the episode and frame
        "state": np.zeros((4, 2)), "actions": np.zeros((4, 3, 2)),
        "episode_index": np.array([0, 0, 1, 1]), "frame_index": np.array([8, 9, 0, 1]),
    }
    batch["state"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"^sample 0 row 2 \(episode 1, frame 0\): 'state' holds "
                       r"nan at index \(2, 1\)"):
        compute_norm_stats([batch])


def test_npz_samples_with_nan_are_named(tmp_path, capsys):
    state = np.zeros((6, 3))
    state[4, 2] = np.nan
    np.savez(tmp_path / "data.npz", state=state, actions=np.zeros((6, 2, 3)))
    with pytest.raises(ValueError, match=r"data.npz: array 'state' row 4 holds nan at index "
                       r"\(4, 2\)"):
        NpzSamples(tmp_path / "data.npz", ["state", "actions"])
    output = tmp_path / "out.json"
    code = cli.main(["norm-stats", str(tmp_path / "data.npz"), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "array 'state' row 4 holds nan" in err and len(err.splitlines()) == 1
    (tmp_path / "cut.npz").write_bytes((tmp_path / "data.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.npz is not an .npz file"):
        NpzSamples(tmp_path / "cut.npz", ["state"])
    assert sorted(os.listdir(tmp_path)) == ["cut.npz", "data.npz"]


def test_the_clean_dataset_still_loads(clean_root):
    data = LeRobotDataset(clean_root, action_horizon=4)
    sample = data[0]
    assert sample["action"].shape == (4, 3) and np.isfinite(sample["action"]).all()
    assert json.loads((clean_root / "meta/info.json").read_text())["total_episodes"] == 3


def test_writer_refuses_non_finite_frames(tmp_path):
    from keras_openpi.data.lerobot_writer import LeRobotWriter

    writer = LeRobotWriter(tmp_path / "new", fps=10)
    state = np.zeros((5, 2), np.float32)
    writer.add_episode({"observation.state": state, "task": "a"})
    state[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"episode 1 frame 3: 'observation.state' holds nan at "
                       r"dimension 1; a dataset must hold finite values"):
        writer.add_episode({"observation.state": state, "task": "a"})
