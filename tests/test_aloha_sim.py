"""examples/aloha_sim on the real simulator: the scripted expert, run_all's phases, the whole loop.

The loop runs on a tiny budget (1 short demonstration, 2 training steps, 1 episode of
20 steps): it checks the plumbing and the outputs, not what the policy learns.

The simulator (gym-aloha, MuJoCo, openpi-client; numpy < 2) lives in its own
environment: `KERAS_OPENPI_SIM_PYTHON`, by default `<repo>/.venv-sim/bin/python`,
made by `examples/aloha_sim/setup.sh` (scripts/test.sh runs it).
"""

import json
import math
import pathlib
import sys

import av
import numpy as np
import pytest
import sim_support
from sim_support import run

from keras_openpi.models import Pi0
from keras_openpi.training import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "aloha_sim"
SIM_PYTHON_ENV = "KERAS_OPENPI_SIM_PYTHON"


def sim_python():
    return sim_support.sim_python(
        SIM_PYTHON_ENV, ".venv-sim", "the ALOHA simulator", "gym-aloha", "aloha_sim"
    )


def test_scripted_expert_transfers_the_cube(tmp_path):
    out = run(
        [sim_python(), EXAMPLE / "scripted_expert.py", "--num-episodes", 1, "--seed", 7,
         "--output", tmp_path, "--image-size", 32, 48],
        timeout=300,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["success_rate"] == 1.0 and summary["episodes"][0]["max_reward"] == 4
    assert "expert success rate 1.00 over 1 episodes" in out
    with np.load(tmp_path / "episode_000000.npz") as episode:
        assert episode["images.top"].shape == (400, 32, 48, 3)
        assert episode["images.top"].dtype == np.uint8 and episode["images.top"].max() > 0
        assert episode["state"].shape == episode["action"].shape == (400, 14)
        assert episode["reward"].max() == 4 and int(episode["seed"]) == 7
        # The gripper commands are openings in [0, 1]; the left one closes on the cube at the end.
        grippers = episode["action"][:, [6, 13]]
        assert grippers.min() >= 0.0 and grippers.max() <= 1.0
        assert episode["action"][-1, 6] == 0.0 and episode["action"][-1, 13] == 1.0


def test_small_config_builds_a_one_camera_pi0():
    config = get_config("pi0_aloha_sim_small")
    assert config.tokenizer == "byte" and config.data.robot == "aloha"
    assert config.data.asset_id == "aloha_sim_scripted" and not config.data.delta_actions
    model = Pi0(**config.model)
    assert model.image_keys == ("base_0_rgb",) and model.action_dim == 14
    assert model.count_params() == 564_878
    lora = get_config("pi0_aloha_sim_lora")
    assert lora.strategy["name"] == "lora" and lora.ema_decay is None
    assert lora.data == get_config("pi0_aloha_sim").data


@pytest.fixture(scope="module")
def run_all():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import run_all
    finally:
        sys.path.remove(str(EXAMPLE))
    return run_all


def test_run_all_kills_a_phase_past_its_timeout(run_all, tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    expected = r"stuck.py ran past 1 s and was killed; see .*stuck.log"
    with pytest.raises(RuntimeError, match=expected):
        run_all.run([sys.executable, script], tmp_path / "stuck.log", timeout=1)
    assert (tmp_path / "stuck.log").read_text() == "started\n"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match="stuck.py failed with exit code 3"):
        run_all.run([sys.executable, script], tmp_path / "stuck.log", timeout=30)


def test_full_budget_trains_openpis_pi0_on_three_cameras(run_all, tmp_path):
    command = run_all.train_command(
        run_all.BUDGETS["full"], tmp_path / "dataset", tmp_path / "assets",
        weights="/ckpt/pi0_base/params", tokenizer="/ckpt/paligemma_tokenizer.model",
    )
    config = json.loads(run([*command, "--print-config"], timeout=120))
    assert config["name"] == "pi0_aloha_sim" and config["num_train_steps"] == 20_000
    assert config["weights"] == "/ckpt/pi0_base/params" and config["batch_size"] == 32
    assert config["data"]["repack"]["images"] == {
        "cam_high": "observation.images.top",
        "cam_left_wrist": "observation.images.left_wrist",
        "cam_right_wrist": "observation.images.right_wrist",
    }
    assert config["data"]["path"] == str(tmp_path / "dataset")
    assert config["data"]["asset_id"] == "aloha_sim_scripted"


@pytest.mark.slow
def test_run_all_tiny_budget_runs_the_whole_loop(tmp_path):
    out = run(
        [sys.executable, EXAMPLE / "run_all.py", "--budget", "tiny", "--output", tmp_path],
        timeout=420,
        **{SIM_PYTHON_ENV: sim_python()},
    )
    last = out.strip().splitlines()[-1]
    assert last.startswith("success_rate="), out[-2000:]
    rate = float(last.removeprefix("success_rate="))
    assert math.isfinite(rate) and 0.0 <= rate <= 1.0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["success_rate"] == rate and summary["eval_episodes"] == 1
    assert math.isfinite(summary["mean_return"]) and summary["mean_max_reward"] in range(5)
    assert summary["dataset"]["episodes"] == 1 and summary["dataset"]["frames"] == 60
    assert summary["training"]["steps"] == 2 and math.isfinite(summary["training"]["final_loss"])

    info = json.loads((tmp_path / "dataset" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["fps"] == 50
    assert info["robot_type"] == "aloha"
    assert info["features"]["observation.images.top"]["shape"] == [64, 64, 3]
    assert info["features"]["observation.state"]["shape"] == [14]
    assert info["features"]["action"]["shape"] == [14]
    stats = json.loads(
        (tmp_path / "run" / "export" / "norm_stats.json").read_text()
    )["norm_stats"]
    assert len(stats["state"]["mean"]) == len(stats["actions"]["mean"]) == 14

    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["episodes"][0]["steps"] == 20 and results["replan_steps"] == 10
    assert results["server_metadata"]["robot"] == "aloha"
    with av.open(str(tmp_path / "episode.mp4")) as video:
        frames = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
    assert len(frames) == 20 and frames[0].shape == (240, 320, 3)
    assert (tmp_path / "episode.png").stat().st_size > 0
