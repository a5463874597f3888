"""ALOHA transfer-cube end to end: demonstrations → dataset → training → serving → success rate.

    python examples/aloha_sim/run_all.py --budget small        # CPU, under 20 minutes

1. `setup.sh` makes the simulator's environment (`.venv-sim`: gym-aloha, openpi-client) and
   headless rendering, when missing.
2. The scripted expert (`scripted_expert.py`, in `.venv-sim`) records demonstrations in
   gym-aloha's joint-space transfer-cube task; its own success rate is the reference.
3. `make_dataset.py` writes the successful ones as a LeRobot v2.1 dataset (the layout of
   LeRobot's `aloha_sim_transfer_cube_*`).
4. `keras-openpi train --config pi0_aloha_sim_small` (or the budget's config) trains on it;
   the norm stats are computed from it; the run exports `export/policy.keras`.
5. `keras-openpi serve` serves the export with the ALOHA mapping, and `evaluate.py` (in
   `.venv-sim`) runs episodes through openpi-client's runtime and `ActionChunkBroker`,
   saving a video of the best episode and a PNG of its most advanced moment.

Everything goes to `--output` (default `outputs/aloha_sim/<budget>`); `summary.json` holds
the figures. The last line printed is `success_rate=<float>`.

Budgets: `tiny` (a smoke test: 1 short demo, 2 training steps, 1 short episode), `small` (a
small π0 from scratch on a CPU) and `full` (openpi's π0 from `pi0_base` on a GPU:
`--weights .../pi0_base/params --tokenizer .../paligemma_tokenizer.model`).
"""

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1] / "common"))

from make_dataset import make_dataset  # noqa: E402
from processes import PolicyServer  # noqa: E402
from processes import run  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
SIM_PYTHON_ENV = "KERAS_OPENPI_SIM_PYTHON"
PROMPT = "Transfer cube"
os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder's warnings and errors only


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of everything one run does.

    Args:
        demos: expert demonstrations recorded (failed ones are not trained on).
        demo_steps: steps of each demonstration (400: the whole task, 8 s at 50 Hz).
        cameras: gym-aloha cameras recorded and sent to the policy (`top` is `cam_high`).
        image_size: rendered `(height, width)`.
        config: the training config.
        train_steps: optimizer steps (None: the config's).
        batch_size: the global batch (None: the config's).
        eval_episodes: closed-loop episodes, each with its own cube position.
        eval_steps: step limit of an episode.
        replan_steps: actions executed from each chunk before the next request.
        keep_failures: train on failed demonstrations too (the tiny budget's are cut short).
        overrides: more `--set KEY=VALUE` for training.
        phase_timeout: seconds after which a phase (demonstrations, training,
            evaluation) is killed and the run fails (None: no limit).
    """

    demos: int
    demo_steps: int
    cameras: tuple
    image_size: tuple
    config: str
    train_steps: int | None
    batch_size: int | None
    eval_episodes: int
    eval_steps: int
    replan_steps: int = 10
    keep_failures: bool = False
    overrides: tuple = ()
    phase_timeout: int | None = None


BUDGETS = {
    "tiny": Budget(
        demos=1, demo_steps=60, cameras=("top",), image_size=(64, 64),
        config="pi0_aloha_sim_small", train_steps=2, batch_size=4, eval_episodes=1,
        eval_steps=20, keep_failures=True,
        overrides=("save_interval=2", "optimizer.warmup_steps=1", "data.norm_stats_max_frames=60"),
        phase_timeout=300,
    ),
    "small": Budget(
        demos=20, demo_steps=400, cameras=("top",), image_size=(96, 96),
        config="pi0_aloha_sim_small", train_steps=None, batch_size=None, eval_episodes=10,
        eval_steps=400, phase_timeout=3600,
    ),
    "full": Budget(
        demos=50, demo_steps=400, cameras=("top", "left_wrist", "right_wrist"),
        image_size=(224, 224), config="pi0_aloha_sim", train_steps=None, batch_size=None,
        eval_episodes=50, eval_steps=400,
        overrides=(
            "data.asset_id=aloha_sim_scripted",
            'data.repack={"images": {"cam_high": "observation.images.top", '
            '"cam_left_wrist": "observation.images.left_wrist", '
            '"cam_right_wrist": "observation.images.right_wrist"}, '
            '"state": "observation.state", "actions": "action"}',
        ),
    ),
}


def sim_python():
    return pathlib.Path(os.environ.get(SIM_PYTHON_ENV, REPO / ".venv-sim" / "bin" / "python"))


def train_command(budget, dataset, assets_dir, *, config=None, weights=None, tokenizer=None,
                  overrides=()):
    """`keras-openpi train` of `budget` on the LeRobot dataset `dataset` (no checkpoint dir)."""
    settings = [f"data.path={dataset}", f"assets_dir={assets_dir}", *budget.overrides]
    if budget.train_steps:  # the learning rate decays over the run's steps
        settings += [f"num_train_steps={budget.train_steps}"]
        settings += [f"optimizer.decay_steps={budget.train_steps}"]
    if budget.batch_size:
        settings.append(f"batch_size={budget.batch_size}")
    if weights:
        settings.append(f"weights={weights}")
    if tokenizer:
        settings.append(f"tokenizer={tokenizer}")
    settings += list(overrides)
    command = [sys.executable, "-m", "keras_openpi", "train", "--config", config or budget.config]
    for setting in settings:
        command += ["--set", setting]
    return command


def last_metrics(run_dir):
    """The last row of the run's `metrics.csv` (step, loss, grad_norm, learning_rate)."""
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return {k: float(v) for k, v in rows[-1].items()}


def run_all(budget, output, *, weights=None, tokenizer=None, config=None, overrides=()):
    """Runs the whole loop; returns the summary dict (also written to `output/summary.json`)."""
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    timings, started = {}, time.time()
    python = sim_python()

    def phase(name, start):
        timings[name] = round(time.time() - start, 1)

    start = time.time()
    if SIM_PYTHON_ENV not in os.environ:
        run(["bash", HERE / "setup.sh"], logs / "setup.log")
    if not python.exists():
        raise FileNotFoundError(f"the simulator's python {python} is missing: run setup.sh.")
    phase("setup", start)

    start = time.time()
    demos = output / "demos"
    shutil.rmtree(demos, ignore_errors=True)
    run(
        [
            python, HERE / "scripted_expert.py", "--num-episodes", budget.demos, "--output",
            demos, "--steps", budget.demo_steps, "--cameras", *budget.cameras, "--image-size",
            *budget.image_size,
        ],
        logs / "expert.log",
        budget.phase_timeout,
    )
    expert = json.loads((demos / "summary.json").read_text())
    phase("demonstrations", start)

    start = time.time()
    dataset, episodes, frames = make_dataset(
        demos, output / "dataset", only_successes=not budget.keep_failures, overwrite=True
    )
    shutil.rmtree(demos)
    print(f"wrote {dataset}: {episodes} episodes, {frames} frames", flush=True)
    phase("dataset", start)

    start = time.time()
    run_dir = output / "run"
    command = train_command(
        budget, dataset, output / "assets", config=config, weights=weights, tokenizer=tokenizer,
        overrides=overrides,
    )
    run([*command, "--checkpoint-dir", run_dir, "--overwrite"], logs / "train.log",
        budget.phase_timeout)
    metrics = last_metrics(run_dir)
    phase("training", start)

    start = time.time()
    results_path, video = output / "eval.json", output / "episode.mp4"
    options = ["--default-prompt", PROMPT] + (["--tokenizer", tokenizer] if tokenizer else [])
    server = PolicyServer(run_dir / "export" / "policy.keras", logs / "serve.log", "aloha", options)
    with server:
        run(
            [
                python, HERE / "evaluate.py", "--port", server.port, "--num-episodes",
                budget.eval_episodes, "--max-steps", budget.eval_steps, "--replan-steps",
                budget.replan_steps, "--cameras", *budget.cameras, "--image-size",
                *budget.image_size, "--video", video, "--output", results_path,
            ],
            logs / "evaluate.log",
            budget.phase_timeout,
        )
    results = json.loads(results_path.read_text())
    phase("evaluation", start)

    summary = {
        "budget": dataclasses.asdict(budget),
        "config": config or budget.config,
        "expert_success_rate": expert["success_rate"],
        "expert_episodes": len(expert["episodes"]),
        "dataset": {"path": str(dataset), "episodes": episodes, "frames": frames},
        "training": {"steps": int(metrics["step"]), "final_loss": metrics["loss"]},
        "success_rate": results["success_rate"],
        "mean_return": results["mean_return"],
        "mean_max_reward": results["mean_max_reward"],
        "eval_episodes": results["num_episodes"],
        "video": results["video"],
        "video_episode": results["video_episode"],
        "frame": results["frame"],
        "seconds": dict(timings, total=round(time.time() - started, 1)),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--output", help="the run's directory (default outputs/aloha_sim/BUDGET)")
    parser.add_argument("--config", help="train this config instead of the budget's")
    parser.add_argument("--weights", help="weights to start from (full: pi0_base/params)")
    parser.add_argument("--tokenizer", help="PaliGemma tokenizer .model (full budget)")
    parser.add_argument("--demos", type=int, help="override the budget's number of demonstrations")
    parser.add_argument("--train-steps", type=int, help="override the budget's training steps")
    parser.add_argument("--eval-episodes", type=int, help="override the budget's episodes")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="more training settings (keras-openpi train --set)",
    )
    args = parser.parse_args(argv)
    # A terminated run still stops its policy server (`PolicyServer.__exit__`).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    budget = BUDGETS[args.budget]
    changes = {"demos": args.demos, "train_steps": args.train_steps,
               "eval_episodes": args.eval_episodes}
    budget = dataclasses.replace(budget, **{k: v for k, v in changes.items() if v is not None})
    output = args.output or REPO / "outputs" / "aloha_sim" / args.budget
    summary = run_all(
        budget, output, weights=args.weights, tokenizer=args.tokenizer, config=args.config,
        overrides=args.set,
    )
    seconds = summary["seconds"]
    print(
        f"\nexpert success rate {summary['expert_success_rate']:.2f} "
        f"({summary['expert_episodes']} demonstrations); trained {summary['training']['steps']} "
        f"steps on {summary['dataset']['episodes']} episodes (final loss "
        f"{summary['training']['final_loss']:.4f}); policy: success rate "
        f"{summary['success_rate']:.2f}, mean return {summary['mean_return']:.1f}, mean max "
        f"reward {summary['mean_max_reward']:.2f} over {summary['eval_episodes']} episodes\n"
        f"video {summary['video']} (episode {summary['video_episode']}); frame "
        f"{summary['frame']}; summary "
        f"{pathlib.Path(output) / 'summary.json'}; {seconds['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')})"
    )
    print(f"success_rate={summary['success_rate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
