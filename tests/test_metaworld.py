"""examples/metaworld: the robot mapping, the configs, the statistics, the expert, the whole study.

The simulator (MetaWorld 3.1.1, MuJoCo 3.3.0, openpi-client; numpy < 2) lives in its own
environment: `KERAS_OPENPI_METAWORLD_PYTHON`, by default `<repo>/.venv-metaworld/bin/python`,
made by `examples/metaworld/setup.sh` (scripts/test.sh runs it). The study runs on its tiny
budget (two pretraining tasks and one held-out task, one demonstration each, two training
steps, one 10-step episode per task): it checks the plumbing and the results' structure, not
what the policies learn.
"""

import json
import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
import sim_support
from sim_support import run

from keras_openpi.data.robots import MetaworldInputs
from keras_openpi.data.robots import MetaworldOutputs
from keras_openpi.data.robots import get_robot
from keras_openpi.data.robots import metaworld
from keras_openpi.models import Pi0
from keras_openpi.tokenizers import ByteTokenizer
from keras_openpi.training import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "metaworld"
SIM_PYTHON_ENV = "KERAS_OPENPI_METAWORLD_PYTHON"
# Top-level module names of the examples: the ALOHA example has a `run_all` and a
# `make_dataset` too, so these are imported with none of them in `sys.modules`.
EXAMPLE_MODULES = (
    "evaluate", "make_dataset", "measure", "processes", "report", "run_all", "scripted_expert",
    "sim_env", "tasks",
)  # fmt: skip


@pytest.fixture(scope="module")
def example():
    """The example's modules that run with keras_openpi (tasks, make_dataset, report, run_all)."""
    others = {name: sys.modules.pop(name) for name in EXAMPLE_MODULES if name in sys.modules}
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_dataset
        import report
        import run_all
        import tasks
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in EXAMPLE_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(others)
    assert pathlib.Path(run_all.__file__).parent == EXAMPLE
    return dict(tasks=tasks, make_dataset=make_dataset, report=report, run_all=run_all)


def sim_python():
    return sim_support.sim_python(
        SIM_PYTHON_ENV, ".venv-metaworld", "MetaWorld", "metaworld", "metaworld"
    )


# === The robot mapping ===


def test_metaworld_inputs_map_the_camera_state_and_actions():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    sample = {
        "observation/image": image,
        "observation/state": np.array([0.1, 0.6, 0.2, 1.0]),
        "actions": rng.uniform(-1, 1, (10, 4)),
        "prompt": "open the drawer",
    }
    out = MetaworldInputs()(sample)
    np.testing.assert_array_equal(out["image"]["base_0_rgb"], image)
    assert out["image"]["left_wrist_0_rgb"].shape == (64, 64, 3)
    assert out["image"]["left_wrist_0_rgb"].max() == 0
    assert out["image_mask"] == {
        "base_0_rgb": True, "left_wrist_0_rgb": False, "right_wrist_0_rgb": False
    }
    assert out["state"].dtype == np.float32 and out["state"].tolist() == pytest.approx(
        [0.1, 0.6, 0.2, 1.0]
    )
    assert out["actions"].shape == (10, 4) and out["prompt"] == "open the drawer"
    # LeRobot's float CHW images become HWC uint8; π0-FAST sees the black wrists (openpi's LIBERO).
    chw = MetaworldInputs("pi0_fast")(
        {"observation/image": np.full((3, 8, 6), 0.5, np.float32), "observation/state": np.zeros(4)}
    )
    assert chw["image"]["base_0_rgb"].shape == (8, 6, 3) and chw["image"]["base_0_rgb"][0, 0, 0] == 127
    assert chw["image_mask"]["right_wrist_0_rgb"] and "actions" not in chw


def test_metaworld_mapping_errors():
    good = metaworld.make_metaworld_example()
    with pytest.raises(ValueError, match="MetaworldInputs: the sample has no 'observation/image'"):
        MetaworldInputs()({"observation/state": np.zeros(4)})
    with pytest.raises(ValueError, match=r"'observation/state' must have shape \(..., 4\), got shape \(39,\)"):
        MetaworldInputs()(dict(good, **{"observation/state": np.zeros(39)}))
    with pytest.raises(ValueError, match="'actions' has non-finite values"):
        MetaworldInputs()(dict(good, actions=np.full((10, 4), np.nan)))
    with pytest.raises(ValueError, match=r"at least 4 dims, got shape \(10, 3\)"):
        MetaworldOutputs()({"actions": np.zeros((10, 3))})
    with pytest.raises(ValueError, match="model_type must be"):
        MetaworldInputs("pi1")


def test_metaworld_outputs_keep_four_dims_in_the_action_space():
    actions = np.array([[0.5, -2.0, 3.0, 0.2, 9.0, 9.0]])
    out = MetaworldOutputs()({"actions": actions})["actions"]
    np.testing.assert_allclose(out, [[0.5, -1.0, 1.0, 0.2]])
    inputs, outputs = get_robot("metaworld")
    assert isinstance(inputs[0], MetaworldInputs) and isinstance(outputs[0], MetaworldOutputs)
    with pytest.raises(ValueError, match="robot 'metaworld' has no delta-action mask"):
        get_robot("metaworld", delta_actions=True)


# === Configs and the training data ===


def test_small_configs_build_a_one_camera_four_dim_pi0():
    config = get_config("pi0_metaworld_small")
    assert config.tokenizer == "byte" and config.data.robot == "metaworld"
    assert config.data.repack == metaworld.LEROBOT_REPACK and config.data.prompt_from_task
    model = Pi0(**config.model)
    assert model.image_keys == ("base_0_rgb",) and model.action_dim == 4
    assert model.action_horizon == 10 and model.image_resolution == (64, 64)
    assert model.count_params() == 557_828
    finetune = get_config("pi0_metaworld_small_finetune")
    assert finetune.model == config.model and finetune.data == get_config("pi0_metaworld").data
    assert finetune.base_weights and finetune.num_train_steps == finetune.optimizer.decay_steps
    assert get_config("pi0_metaworld_lora").strategy["name"] == "lora"


def _fake_demos(directory, tasks, episodes=2, length=12):
    """`scripted_expert.py`'s layout without the simulator: random frames, the tasks' prompts."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for task in tasks:
        for k in range(episodes):
            np.savez(
                directory / f"{task['name']}_{k:04d}.npz",
                image=rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8),
                state=rng.uniform(0, 1, (length, 4)).astype(np.float32),
                environment_state=rng.uniform(0, 1, (length, 39)).astype(np.float32),
                action=rng.uniform(-1, 1, (length, 4)).astype(np.float32),
                reward=np.zeros(length, np.float32),
                task=task["name"], prompt=task["prompt"], seed=0, index=k,
            )
    (directory / "summary.json").write_text(json.dumps({"fps": 80}))


def test_dataset_feeds_the_small_config(example, tmp_path):
    from keras_openpi.training import data as training_data

    prompts = example["tasks"].PROMPTS
    tasks = [{"name": n, "prompt": prompts[n]} for n in ("drawer-open-v3", "door-open-v3")]
    _fake_demos(tmp_path / "demos", tasks)
    root, episodes, frames = example["make_dataset"].make_dataset(
        tmp_path / "demos", tmp_path / "dataset", tasks=["door-open-v3"]
    )
    assert (episodes, frames) == (2, 24)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["robot_type"] == "sawyer" and info["fps"] == 80
    assert info["features"]["observation.image"] == {
        "dtype": "image", "shape": [64, 64, 3], "names": ["height", "width", "channel"]
    }
    assert info["features"]["observation.environment_state"]["shape"] == [39]

    config = get_config("pi0_metaworld_small")
    config = config.__class__(**{**config.__dict__, "data": config.data.__class__(
        **{**config.data.__dict__, "path": str(root)})})
    source = training_data.open_source(config, 10)
    sample = training_data.first_sample(source, training_data.robot_transforms(config).inputs)
    assert sample["prompt"] == "open the door"
    assert sample["image"]["base_0_rgb"].shape == (64, 64, 3)
    assert sample["state"].shape == (4,) and sample["actions"].shape == (10, 4)
    with pytest.raises(FileNotFoundError, match="no demonstrations of reach-v3"):
        example["make_dataset"].make_dataset(tmp_path / "demos", tmp_path / "x", tasks=["reach-v3"])


def test_prompts_name_every_mt50_task_in_32_bytes(example):
    tasks = example["tasks"]
    assert len(tasks.PROMPTS) == 50 and len(set(tasks.PROMPTS.values())) == 50
    assert max(len(p.encode()) for p in tasks.PROMPTS.values()) <= tasks.MAX_PROMPT_BYTES
    max_len = get_config("pi0_metaworld_small").model["max_token_len"]
    tokenizer = ByteTokenizer(max_len)
    for prompt in tasks.PROMPTS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a truncated prompt warns
            ids, mask = tokenizer.tokenize(prompt)
        assert int(mask.sum()) == len(prompt.encode()) + 2  # BOS, the bytes, "\n"
    assert max_len == tasks.MAX_PROMPT_BYTES + 2
    assert not set(tasks.PRETRAIN_TASKS) & set(tasks.HELD_OUT_TASKS)
    assert len(tasks.PRETRAIN_TASKS) == 8 and len(tasks.HELD_OUT_TASKS) == 3
    with pytest.raises(ValueError, match="unknown MetaWorld task 'reach-v2'"):
        tasks.check_tasks(["reach-v3", "reach-v2"])


# === Statistics ===


def test_wilson_interval_and_pooling(example):
    report = example["report"]
    # Wilson's 95 % interval, by hand: p = 0.9, n = 20, z = 1.96.
    low, high = report.wilson(18, 20)
    assert low == pytest.approx(0.6990, abs=1e-4) and high == pytest.approx(0.9721, abs=1e-4)
    assert report.wilson(0, 10)[0] == 0.0 and report.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert report.wilson(10, 10)[1] == pytest.approx(1.0) and report.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, 5\], got 6"):
        report.wilson(6, 5)
    evals = [
        {"tasks": {"a": {"successes": 3, "episodes": 5}, "b": {"successes": 0, "episodes": 5}}},
        {"tasks": {"a": {"successes": 5, "episodes": 5}, "b": {"successes": 2, "episodes": 5}}},
    ]
    pooled = report.pooled(evals)
    assert (pooled["successes"], pooled["episodes"], pooled["success_rate"]) == (10, 20, 0.5)
    assert pooled["per_task"]["a"] == {"successes": 8, "episodes": 10, "success_rate": 0.8}
    assert pooled["ci95"] == [round(x, 4) for x in report.wilson(10, 20)]


# === The simulator ===


def test_scripted_expert_records_successful_episodes(tmp_path):
    out = run(
        [sim_python(), EXAMPLE / "scripted_expert.py", "--tasks", "button-press-topdown-v3",
         "--episodes", 2, "--output", tmp_path, "--image-size", 48, 64],
        timeout=300,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fps"] == 80 and summary["successes"] == 2
    assert summary["success_rate"] == 1.0 and summary["attempts"] == 2
    assert "expert success rate 1.00 (2/2 episodes, 1 tasks" in out
    with np.load(tmp_path / "button-press-topdown-v3_0001.npz") as episode:
        steps = len(episode["action"])
        assert 20 < steps < 200 and episode["image"].shape == (steps, 48, 64, 3)
        assert episode["image"].dtype == np.uint8 and episode["image"].std() > 10
        assert episode["state"].shape == (steps, 4) and episode["environment_state"].shape == (steps, 39)
        np.testing.assert_array_equal(episode["state"], episode["environment_state"][:, :4])
        assert np.abs(episode["action"]).max() <= 1.0
        assert str(episode["prompt"]) == "press the button from the top"
        assert (int(episode["seed"]), int(episode["index"])) == (0, 1)
        # The gripper starts open (opening near 1) and the hand starts near (0, 0.4, 0.2).
        assert episode["state"][0, 3] > 0.9
        np.testing.assert_allclose(episode["state"][0, :3], [0.0, 0.4, 0.2], atol=0.02)


# === The study ===


def test_budgets_cover_the_study(example):
    run_all = example["run_all"]
    small = run_all.BUDGETS["small"]
    labels = [label for label, _ in small.strategies]
    assert labels == ["full", "lora-r4", "lora-r16", "lora-r64", "lora-r16+freeze_vision",
                      "action_expert_only", "frozen_vision"]
    assert small.scratch and len(small.seeds) >= 2 and len(small.held_out_tasks) >= 3
    assert small.held_out_episodes * len(small.seeds) >= 20 and 10 <= small.held_out_demos <= 20
    assert small.base_episodes >= 20
    from keras_openpi.finetuning import STRATEGIES

    for _, strategy in small.strategies:
        assert strategy["name"] in STRATEGIES
    full = run_all.BUDGETS["full"]
    assert full.base_config == "pi0_metaworld" and all(s["remat"] for _, s in full.strategies)
    with pytest.raises(SystemExit):
        run_all.main(["--budget", "full"])  # needs --weights and --tokenizer


@pytest.mark.slow
def test_a_resumed_study_adds_its_times_to_the_earlier_parts(example, tmp_path, monkeypatch):
    run_all = example["run_all"]
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))  # Study sets a default
    results = tmp_path / "metaworld.json"
    results.write_text(json.dumps({"seconds": {
        "training": {"wall_s": 10.0, "cpu_s": 8.0}, "total": {"wall_s": 12.0, "parts": 1},
    }}))  # fmt: skip
    for resume, expected in [
        (True, {"training": {"wall_s": 15.0, "cpu_s": 12.0}, "total": {"wall_s": 19.5, "parts": 2}}),
        (False, {"training": {"wall_s": 5.0, "cpu_s": 4.0}, "total": {"wall_s": 7.5, "parts": 1}}),
    ]:
        study = run_all.Study(run_all.BUDGETS["tiny"], tmp_path / "study", resume=resume)
        study.timed("training", {"wall_s": 5.0, "cpu_s": 4.0})
        assert study.seconds(7.5, results) == expected


def test_run_all_tiny_budget_runs_the_whole_study(tmp_path):
    out = run(
        [sys.executable, EXAMPLE / "run_all.py", "--budget", "tiny", "--output", tmp_path],
        timeout=1200,
        **{SIM_PYTHON_ENV: sim_python()},
    )
    last = out.strip().splitlines()[-1]
    assert last.startswith("held_out_best="), out[-3000:]
    best = float(last.removeprefix("held_out_best="))
    assert 0.0 <= best <= 1.0

    results = json.loads((tmp_path / "metaworld.json").read_text())
    assert results["tasks"] == {"pretrain": ["drawer-open-v3", "button-press-topdown-v3"],
                                "held_out": ["door-close-v3"]}
    # The expert succeeds; one demonstration per task; the datasets hold them.
    expert = results["expert"]["pretrain"]
    assert expert["successes"] == 2 and 0.5 <= expert["success_rate"] <= 1.0
    assert [t["task"] for t in expert["tasks"]] == ["drawer-open-v3", "button-press-topdown-v3"]
    assert results["datasets"]["pretrain"]["episodes"] == 2
    assert results["datasets"]["held_out"]["episodes"] == 1
    assert 20 < results["datasets"]["held_out"]["frames"] < 200
    info = json.loads((tmp_path / "dataset_pretrain" / "meta" / "info.json").read_text())
    assert info["features"]["observation.image"]["shape"] == [64, 64, 3]
    assert info["total_tasks"] == 2 and info["features"]["action"]["shape"] == [4]

    base = results["base"]
    assert base["training"]["steps"] == 2 and math.isfinite(base["training"]["final_loss"])
    assert base["pretrain"]["episodes"] == 2 and base["held_out"]["episodes"] == 1
    assert set(base["pretrain"]["per_task"]) == {"drawer-open-v3", "button-press-topdown-v3"}

    assert list(results["strategies"]) == ["lora-r4", "scratch"]
    lora, scratch = results["strategies"]["lora-r4"], results["strategies"]["scratch"]
    assert lora["from"] == "base" and scratch["from"] == "scratch"
    for entry in (lora, scratch):
        held = entry["held_out"]
        assert held["episodes"] == 1 and held["successes"] in (0, 1)
        assert 0.0 <= held["ci95"][0] <= held["success_rate"] <= held["ci95"][1] <= 1.0
        assert entry["runs"][0]["training"]["steps"] == 2
        assert entry["train_step_bytes"] > 0 and entry["step_seconds"] > 0
        # The step's matmul FLOP/s against a plain float32 matmul's, timed around it.
        assert 0 < entry["step_ratio_to_matmul"] < 2
    assert results["seconds"]["total"]["parts"] == 1
    # LoRA trains fewer weights than the whole model; the baseline trains all of them.
    assert 0 < lora["trainable_params"] < lora["total_params"]
    assert scratch["trainable_params"] == scratch["total_params"] < lora["total_params"]
    assert lora["forgetting"]["episodes"] == 2 and scratch["forgetting"] is None

    evals = json.loads((tmp_path / "evals" / "lora-r4_seed0_held_out.json").read_text())
    episode = evals["tasks"]["door-close-v3"]["episode_results"][0]
    assert episode["steps"] <= 10 and episode["seed"] == 100_000
    assert evals["server_metadata"]["robot"] == "metaworld" and evals["replan_steps"] == 5
    # The table's header, the base and the 2 strategies.
    assert (tmp_path / "metaworld.md").read_text().count("\n| ") == 4
    assert (tmp_path / "metaworld.png").stat().st_size > 0
    assert (tmp_path / "frames" / "base" / "drawer-open-v3.png").stat().st_size > 0

