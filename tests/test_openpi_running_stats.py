"""openpi's quantiles (`--quantiles openpi`): equal to openpi's own RunningStats, number for number.

The expected numbers were computed by openpi's `shared/normalize.py` under
numpy 1.26 (tests/fixtures/openpi_quantiles/generate.py) on the inputs of
tests/openpi_quantile_cases.py.
"""

import json
import pathlib

import numpy as np
import pytest
from openpi_quantile_cases import cases
from openpi_quantile_cases import robot_like

from keras_openpi import cli
from keras_openpi.data.running_stats import RunningStats
from keras_openpi.data.running_stats import compute_norm_stats
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.openpi_running_stats import OpenpiRunningStats

FIELDS = ("mean", "std", "q01", "q99")
# The cases hold a constant dimension on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:norm stats .* has a near-zero range")
EXPECTED = json.loads(
    (pathlib.Path(__file__).parent / "fixtures" / "openpi_quantiles" / "expected.json").read_text()
)["cases"]


def _assert_openpis(stats, case):
    for field in FIELDS:
        np.testing.assert_array_equal(
            getattr(stats, field), EXPECTED[case][field], err_msg=f"{case} {field}"
        )


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_equals_openpi_running_stats(case):
    stats = OpenpiRunningStats()
    for batch in cases()[case]:
        stats.update(batch)
    _assert_openpis(stats.get_statistics(), case)


def test_openpis_edge_case_differs_from_np_quantile():
    data = np.arange(12).reshape(4, 3)
    openpi = OpenpiRunningStats()
    openpi.update(data)
    exact = RunningStats()
    exact.update(data)
    # openpi: the left edge of the last of 5000 bins over [-1e-10, 9 + 1e-10]; numpy: 8.91.
    np.testing.assert_allclose(openpi.get_statistics().q99, [8.9982, 9.9982, 10.9982], atol=1e-9)
    np.testing.assert_allclose(exact.get_statistics().q99, [8.91, 9.91, 10.91], atol=9 / 10000)
    np.testing.assert_allclose(openpi.get_statistics().q01, [-1e-10, 1, 2], atol=1e-9)


def test_compute_norm_stats_openpi_batches_like_openpis_loader():
    # float64 rows become openpi's float32 batches of 32, in order.
    states = robot_like(320, seed=1)
    samples = [{"state": row, "actions": row[None, :3]} for row in states]
    stats = compute_norm_stats(samples, quantiles="openpi", batch_size=32)
    _assert_openpis(stats["state"], "float32_batches_of_32")
    # Action chunks (H, d): a batch of 8 chunks is one update of 8 * H vectors.
    chunks = np.concatenate(cases()["action_chunks"])
    samples = [{"state": chunk[0], "actions": chunk} for chunk in chunks]
    stats = compute_norm_stats(samples, quantiles="openpi", batch_size=8)
    _assert_openpis(stats["actions"], "action_chunks")


def test_compute_norm_stats_openpi_leaves_out_the_last_partial_batch():
    rows = robot_like(330, seed=1)
    samples = [{"state": row, "actions": row[None]} for row in rows]
    with pytest.warns(UserWarning, match="the last 10 of 330 samples .* are left out"):
        stats = compute_norm_stats(samples, quantiles="openpi", batch_size=32)
    _assert_openpis(stats["state"], "float32_batches_of_32")
    with pytest.raises(ValueError, match="whole batches of 32 samples, but the data source gave 5"):
        compute_norm_stats(samples[:5], quantiles="openpi")
    with pytest.raises(ValueError, match="'quantiles' must be one of \\('exact', 'openpi'\\)"):
        compute_norm_stats(samples, quantiles="histogram")
    with pytest.raises(ValueError, match="'batch_size' must be a positive integer, got 0"):
        compute_norm_stats(samples, quantiles="openpi", batch_size=0)
    with pytest.raises(ValueError, match="'state' must be a numeric array of shape"):
        compute_norm_stats([{"state": np.array(["a", "b"]), "actions": np.zeros(2)}])


def test_openpi_running_stats_errors():
    stats = OpenpiRunningStats()
    stats.update(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 vectors"):
        stats.get_statistics()
    with pytest.raises(ValueError, match="vectors of 2 dims after vectors of 3"):
        stats.update(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="got nan \\(vector 0, dimension 1\\)"):
        stats.update(np.array([[0.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="needs a numeric array of shape"):
        stats.update(np.array(["x"]))


def test_norm_stats_command_quantiles_openpi(tmp_path, capsys):
    np.savez(tmp_path / "data.npz", state=robot_like(330, seed=1), actions=np.zeros((330, 2, 1)))
    output = tmp_path / "openpi.json"
    args = ["norm-stats", str(tmp_path / "data.npz"), "--output", str(output)]
    assert cli.main(args + ["--quantiles", "openpi", "--batch-size", "32"]) == 0
    assert "the last 10 of 330 samples" in capsys.readouterr().err
    _assert_openpis(load_norm_stats(output)["state"], "float32_batches_of_32")
    assert cli.main(args + ["--batch-size", "32"]) == 2
    assert "--batch-size sets openpi's batches: it needs --quantiles openpi" in (
        capsys.readouterr().err
    )
    assert cli.main(args + ["--quantiles", "openpi", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
