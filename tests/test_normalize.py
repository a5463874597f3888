"""Norm stats: RunningStats, openpi's norm_stats.json, and `keras-openpi norm-stats`."""

import json
import warnings

import numpy as np
import pytest

from keras_openpi import cli
from keras_openpi.data.normalize import NormStats
from keras_openpi.data.running_stats import RunningStats
from keras_openpi.data.running_stats import compute_norm_stats
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.normalize import norm_stats_from_json
from keras_openpi.data.normalize import norm_stats_to_json
from keras_openpi.data.normalize import normalize
from keras_openpi.data.normalize import save_norm_stats
from keras_openpi.data.normalize import unnormalize
from keras_openpi.data.npz_source import NpzSamples

# === RunningStats ===


def test_running_stats_mean_and_std_are_exact():
    data = np.arange(12.0).reshape(4, 3)
    stats = RunningStats()
    for row in data:
        stats.update(row[None])  # one vector at a time, as openpi's test
    result = stats.get_statistics()
    np.testing.assert_allclose(result.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result.std, data.std(axis=0), rtol=1e-12)
    # Every leading axis is a batch axis.
    batch = np.random.default_rng(0).random((2, 3, 4))
    stats = RunningStats()
    stats.update(batch)
    flat = batch.reshape(-1, 4)
    np.testing.assert_allclose(stats.get_statistics().mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.get_statistics().std, flat.std(axis=0), rtol=1e-12)


def test_running_stats_quantiles_within_one_bin_of_numpy():
    rng = np.random.default_rng(1)
    stats = RunningStats()
    chunks = []
    for i in range(40):
        # The range keeps growing (and shifting), so the histogram is re-windowed often.
        chunk = rng.standard_normal((500, 4)) * (1 + 0.5 * i) + 3.0 * (i % 4)
        chunk[:, 2] = rng.exponential(size=500) ** 3  # heavy tail
        chunk[:, 3] = rng.integers(0, 2, size=500)  # a binary gripper
        chunks.append(chunk)
        stats.update(chunk)
    data = np.concatenate(chunks)
    result = stats.get_statistics()
    bin_width = stats.bin_width
    # The bins are at least as fine as openpi's (5000 bins over [min, max]).
    assert np.all(bin_width <= (data.max(axis=0) - data.min(axis=0)) / 5000)
    for q, estimate in ((0.01, result.q01), (0.99, result.q99)):
        error = np.abs(estimate - np.quantile(data, q, axis=0))
        assert np.all(error <= bin_width), (q, error / bin_width)
    np.testing.assert_allclose(result.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(result.std, data.std(axis=0), rtol=1e-10)


def test_running_stats_small_and_constant_data():
    data = np.array([[0.0, 5.0], [3.0, 5.0], [6.0, 5.0], [9.0, 5.0]])
    stats = RunningStats()
    stats.update(data)
    result = stats.get_statistics()
    # numpy: 0 + 0.03 * 3 = 0.09 and 6 + 0.97 * 3 = 8.91, within one bin (9 / 10000).
    np.testing.assert_allclose(result.q01[0], 0.09, atol=9 / 10000)
    np.testing.assert_allclose(result.q99[0], 8.91, atol=9 / 10000)
    assert result.q01[1] == 5.0 and result.q99[1] == 5.0 and result.std[1] == 0.0


def test_running_stats_errors():
    stats = RunningStats()
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 vectors"):
        stats.get_statistics()
    with pytest.raises(ValueError, match="vectors of 2 dims after vectors of 3"):
        stats.update(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        stats.update(np.full((1, 3), np.nan))


# === compute_norm_stats ===


def test_compute_norm_stats_over_samples_with_action_chunks():
    rng = np.random.default_rng(2)
    samples = [
        {"state": rng.standard_normal(3), "actions": rng.standard_normal((5, 2)), "prompt": "x"}
        for _ in range(300)
    ]
    stats = compute_norm_stats(samples, chunk_size=64)
    actions = np.stack([s["actions"] for s in samples]).reshape(-1, 2)  # every chunk step counts
    np.testing.assert_allclose(stats["actions"].mean, actions.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats["actions"].std, actions.std(axis=0), rtol=1e-10)
    states = np.stack([s["state"] for s in samples])
    np.testing.assert_allclose(stats["state"].mean, states.mean(axis=0), rtol=1e-10)
    limited = compute_norm_stats(samples, max_samples=10)
    np.testing.assert_allclose(limited["state"].mean, states[:10].mean(axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match="sample 0 has no 'actions'"):
        compute_norm_stats([{"state": np.zeros(2)}])


def test_compute_norm_stats_warns_about_constant_dims():
    samples = [
        {"state": np.array([float(i), 0.5]), "actions": np.ones((2, 1)) * i} for i in range(5)
    ]
    with pytest.warns(UserWarning) as record:
        compute_norm_stats(samples)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert (
        "norm stats 'state' dimension 1 has a near-zero range (std = 0, q99 - q01 = 0)"
        in messages[0]
    )


def test_normalize_functions():
    stats = NormStats(mean=[1.0, -1.0], std=[2.0, 0.5], q01=[-1.0, 0.0], q99=[3.0, 1.0])
    x = np.array([[3.0, 0.0]], np.float32)
    np.testing.assert_allclose(normalize(x, stats), [[2 / (2 + 1e-6), 1 / (0.5 + 1e-6)]], rtol=1e-6)
    np.testing.assert_allclose(
        normalize(x, stats, use_quantiles=True), [[4 / (4 + 1e-6) * 2 - 1, -1.0]], rtol=1e-6
    )
    assert normalize(np.array([1, 2]), stats).dtype == np.float64
    with pytest.raises(ValueError, match="'actions' has 1 dims but its norm stats have 2"):
        unnormalize(np.zeros(1), stats, key="actions")


# === openpi's norm_stats.json ===

OPENPI_JSON = """{
  "norm_stats": {
    "state": {
      "mean": [
        0.5,
        -1.25
      ],
      "std": [
        1.0,
        0.125
      ],
      "q01": [
        -1.5,
        -2.0
      ],
      "q99": [
        2.5,
        0.0
      ]
    },
    "actions": {
      "mean": [
        0.0
      ],
      "std": [
        2.0
      ],
      "q01": null,
      "q99": null
    }
  }
}"""


def test_json_is_openpis_format():
    stats = {
        "state": NormStats(mean=[0.5, -1.25], std=[1.0, 0.125], q01=[-1.5, -2.0], q99=[2.5, 0.0]),
        "actions": NormStats(mean=[0.0], std=[2.0]),
    }
    assert norm_stats_to_json(stats) == OPENPI_JSON
    loaded = norm_stats_from_json(OPENPI_JSON)
    assert sorted(loaded) == ["actions", "state"]
    np.testing.assert_array_equal(loaded["state"].q99, [2.5, 0.0])
    assert loaded["actions"].q01 is None and loaded["actions"].dim == 1


def test_save_and_load_file_or_directory(tmp_path):
    stats = compute_norm_stats(
        [{"state": np.array([i, i * 0.5]), "actions": np.ones((3, 2)) * i} for i in range(4)]
    )
    path = save_norm_stats(tmp_path / "assets" / "trossen", stats)
    assert path == tmp_path / "assets" / "trossen" / "norm_stats.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["norm_stats.json"]
    assert json.loads(path.read_text())["norm_stats"]["state"]["mean"] == [1.5, 0.75]
    for where in (path.parent, path):
        loaded = load_norm_stats(where)
        for key in stats:
            np.testing.assert_array_equal(loaded[key].q99, stats[key].q99)
    other = save_norm_stats(tmp_path / "custom.json", stats)
    assert other.name == "custom.json" and other.is_file()
    with pytest.raises(FileNotFoundError, match="no norm stats file at"):
        load_norm_stats(tmp_path / "missing")


def test_json_errors():
    with pytest.raises(ValueError, match='must hold \\{"norm_stats"'):
        norm_stats_from_json('{"state": {}}')
    with pytest.raises(ValueError, match="entry 'state' needs 'mean' and 'std'"):
        norm_stats_from_json('{"norm_stats": {"state": {"mean": [1]}}}')
    with pytest.raises(
        ValueError, match="entry 'state': NormStats 'std' must be a vector of the same length"
    ):
        norm_stats_from_json('{"norm_stats": {"state": {"mean": [1, 2], "std": [1]}}}')
    with pytest.raises(ValueError, match="NaN or infinite"):
        norm_stats_to_json({"state": NormStats(mean=[np.nan], std=[1.0])})


# === The command ===


def _write_npz(path, rows=400):
    rng = np.random.default_rng(3)
    state = rng.standard_normal((rows, 3))
    state[:, 2] = 1.0  # a constant dimension
    action = rng.standard_normal((rows, 4, 2)) * 2 + 1
    np.savez(path, **{"observation.state": state, "action": action})
    return state, action


def test_norm_stats_command(tmp_path, capsys):
    state, action = _write_npz(tmp_path / "data.npz")
    code = cli.main(
        [
            "norm-stats",
            str(tmp_path / "data.npz"),
            "--output",
            str(tmp_path / "assets"),
            "--keys",
            "state=observation.state",
            "actions=action",
        ]
    )
    assert code == 0
    out = capsys.readouterr()
    assert "warning: norm stats 'state' dimension 2 has a near-zero range" in out.err
    assert "wrote" in out.out and "state (3 dims)" in out.out
    stats = load_norm_stats(tmp_path / "assets")
    np.testing.assert_allclose(stats["state"].mean, state.mean(axis=0), rtol=1e-10)
    flat = action.reshape(-1, 2)
    np.testing.assert_allclose(stats["actions"].std, flat.std(axis=0), rtol=1e-10)
    tolerance = (flat.max(axis=0) - flat.min(axis=0)) / 5000
    assert np.all(np.abs(stats["actions"].q99 - np.quantile(flat, 0.99, axis=0)) <= tolerance)


def test_norm_stats_command_subset_and_errors(tmp_path, capsys):
    state, _ = _write_npz(tmp_path / "data.npz")
    output = tmp_path / "subset.json"
    args = ["norm-stats", str(tmp_path / "data.npz"), "--output", str(output)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(args + ["--keys", "state=observation.state", "--max-frames", "50"])
    assert code == 0
    subset = np.random.default_rng(0).permutation(len(state))[:50]
    np.testing.assert_allclose(
        load_norm_stats(output)["state"].mean, state[subset].mean(axis=0), rtol=1e-10
    )
    capsys.readouterr()
    assert cli.main(args) == 2  # default keys 'state', 'actions' are not in the file
    assert "has no array 'state'" in capsys.readouterr().err
    assert cli.main(["norm-stats", str(tmp_path / "nothing.npz"), "--output", str(output)]) == 2
    assert "no data source at" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("1,2\n")
    assert cli.main(["norm-stats", str(tmp_path / "data.csv"), "--output", str(output)]) == 2
    assert "unsupported data source" in capsys.readouterr().err


def test_npz_samples(tmp_path):
    np.savez(tmp_path / "bad.npz", state=np.zeros((3, 2)), actions=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="must share their first axis"):
        NpzSamples(tmp_path / "bad.npz", ["state", "actions"])
    np.savez(tmp_path / "ok.npz", state=np.arange(6.0).reshape(3, 2))
    rows = [s["state"].tolist() for s in NpzSamples(tmp_path / "ok.npz", ["state"])]
    assert rows == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
