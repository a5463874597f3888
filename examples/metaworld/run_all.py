"""Which freezing strategy gives a policy that works? The MetaWorld study, end to end, in closed loop.

    python examples/metaworld/run_all.py --budget small      # 2 CPU cores (see README.md)

1. `setup.sh` makes `.venv-metaworld` (MetaWorld 3.1.1, openpi-client) and headless rendering.
2. `scripted_expert.py` (in `.venv-metaworld`) records MetaWorld's scripted experts on the
   pretraining tasks and on the held-out tasks (successful episodes only); `make_dataset.py`
   writes each set as a LeRobot v2.1 dataset.
3. The base: `keras-openpi train --config pi0_metaworld_small` (a small π0 from scratch) on
   the pretraining tasks, served with `keras-openpi serve --robot metaworld` and evaluated per
   task through openpi-client (`evaluate.py`, MetaWorld's `success` flag).
4. `measure.py`: each strategy's trainable parameters, train-step memory (XLA's analysis of the
   compiled step) and time per step.
5. For each training seed and each strategy, the base is fine-tuned on the held-out tasks'
   few demonstrations (`keras-openpi train --config pi0_metaworld_small_finetune`, the base's
   norm stats), and the same data trains a π0 from scratch (the baseline). Each policy is
   served and evaluated on the held-out tasks and (forgetting) on the pretraining tasks.
6. The results (`metaworld.json`: pooled success with Wilson 95 % intervals, per task, per
   seed; the costs; every phase's wall and CPU time), a markdown table and a plot (success vs
   trainable parameters). The small budget writes them to `benchmarks/results/`.

Everything else goes to `--output` (default `outputs/metaworld/<budget>`). `--resume` keeps
what a previous run of the same output finished (demonstrations, datasets, base, runs).
The last line printed is `held_out_best=<float>` (the best strategy's pooled success).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import signal
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "common"))

from make_dataset import make_dataset  # noqa: E402
from processes import PolicyServer  # noqa: E402
from processes import run  # noqa: E402
from report import pooled  # noqa: E402
from report import write_report  # noqa: E402
from tasks import HELD_OUT_TASKS  # noqa: E402
from tasks import PRETRAIN_TASKS  # noqa: E402

SIM_PYTHON_ENV = "KERAS_OPENPI_METAWORLD_PYTHON"
os.environ.setdefault("SVT_LOG", "1")
SCRATCH = "scratch"

# The strategies of the study (`keras_openpi.finetuning.STRATEGIES` and their options).
STUDY_STRATEGIES = (
    ("full", {"name": "full"}),
    ("lora-r4", {"name": "lora", "rank": 4}),
    ("lora-r16", {"name": "lora", "rank": 16}),
    ("lora-r64", {"name": "lora", "rank": 64}),
    ("lora-r16+freeze_vision", {"name": "lora", "rank": 16, "freeze_vision": True}),
    ("action_expert_only", {"name": "action_expert_only"}),
    ("frozen_vision", {"name": "frozen_vision"}),
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of everything one study does.

    Args:
        name: the budget's name.
        pretrain_tasks, held_out_tasks: MT50 task names.
        pretrain_demos, held_out_demos: successful expert episodes per task.
        image_size: rendered `(height, width)`.
        base_config, base_steps: the base's training config and optimizer steps.
        finetune_config, finetune_steps: the fine-tuning config and steps (the scratch baseline
            trains `base_config`'s model for as many steps, on the same schedule).
        batch_size: the batch of every training run (None: the configs').
        strategies: `(label, strategy dict)` pairs; `scratch` adds the from-scratch baseline.
        scratch: train the baseline from scratch on the held-out data.
        seeds: training seeds of the fine-tuning runs.
        base_episodes: episodes per pretraining task for the base.
        held_out_episodes: episodes per held-out task per fine-tuned policy (and for the base).
        forgetting_episodes: episodes per pretraining task per fine-tuned policy.
        forgetting_seeds: the seeds whose policies are evaluated for forgetting.
        eval_steps: an episode's step limit.
        replan_steps: actions executed from each chunk before the next request.
        measure: measure each strategy's memory and time per step (`measure.py`).
        overrides: more `--set KEY=VALUE` for every training run.
        results: where the results JSON goes (None: `<output>/metaworld.json`).
        phase_timeout: seconds after which one command is killed (None: no limit).
    """

    name: str
    pretrain_tasks: tuple
    held_out_tasks: tuple
    pretrain_demos: int
    held_out_demos: int
    image_size: tuple
    base_config: str
    base_steps: int | None
    finetune_config: str
    finetune_steps: int | None
    batch_size: int | None
    strategies: tuple
    scratch: bool
    seeds: tuple
    base_episodes: int
    held_out_episodes: int
    forgetting_episodes: int
    forgetting_seeds: tuple
    eval_steps: int
    replan_steps: int = 5
    measure: bool = True
    overrides: tuple = ()
    results: str | None = None
    phase_timeout: int | None = None


# The tiny budget's π0: one layer everywhere, so that each of its programs compiles in seconds.
_TINY_GEMMA = dict(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
TINY_MODEL = (
    f"model.paligemma_variant={json.dumps(_TINY_GEMMA)}",
    f"model.action_expert_variant={json.dumps(_TINY_GEMMA)}",
    'model.vision_variant={"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, '
    '"patch_size": 16}',
)

BUDGETS = {
    "tiny": Budget(
        name="tiny", pretrain_tasks=("drawer-open-v3", "button-press-topdown-v3"),
        held_out_tasks=("door-close-v3",), pretrain_demos=1, held_out_demos=1,
        image_size=(64, 64), base_config="pi0_metaworld_small", base_steps=2,
        finetune_config="pi0_metaworld_small_finetune", finetune_steps=2, batch_size=4,
        strategies=(("lora-r4", {"name": "lora", "rank": 4}),), scratch=True, seeds=(0,),
        base_episodes=1, held_out_episodes=1, forgetting_episodes=1, forgetting_seeds=(0,),
        eval_steps=10, measure=True,
        overrides=("save_interval=2", "optimizer.warmup_steps=1", *TINY_MODEL),
        phase_timeout=300,
    ),
    "small": Budget(
        name="small", pretrain_tasks=PRETRAIN_TASKS, held_out_tasks=HELD_OUT_TASKS,
        pretrain_demos=25, held_out_demos=20, image_size=(64, 64),
        base_config="pi0_metaworld_small", base_steps=None,
        finetune_config="pi0_metaworld_small_finetune", finetune_steps=None, batch_size=None,
        strategies=STUDY_STRATEGIES, scratch=True, seeds=(0, 1), base_episodes=20,
        held_out_episodes=10, forgetting_episodes=5, forgetting_seeds=(0,), eval_steps=200,
        results=str(REPO / "benchmarks" / "results" / "metaworld.json"), phase_timeout=3600,
    ),
    "full": Budget(
        name="full", pretrain_tasks=PRETRAIN_TASKS, held_out_tasks=HELD_OUT_TASKS,
        pretrain_demos=50, held_out_demos=20, image_size=(224, 224),
        base_config="pi0_metaworld", base_steps=None, finetune_config="pi0_metaworld",
        finetune_steps=2_000, batch_size=None,
        strategies=tuple(
            (label, dict(strategy, remat=True)) for label, strategy in STUDY_STRATEGIES
        ),
        scratch=False, seeds=(0, 1, 2), base_episodes=50, held_out_episodes=20,
        forgetting_episodes=20, forgetting_seeds=(0, 1, 2), eval_steps=500,
    ),
}


def sim_python():
    return pathlib.Path(
        os.environ.get(SIM_PYTHON_ENV, REPO / ".venv-metaworld" / "bin" / "python")
    )


class Study:
    """One study's directory, budget and bookkeeping (times, resumable phases).

    Args:
        budget: the `Budget`.
        output: the study's directory.
        resume: keep what a previous run in `output` finished.
        weights, tokenizer: the full budget's `pi0_base` params and PaliGemma tokenizer.
        overrides: more `--set KEY=VALUE` for every training run.
    """

    def __init__(self, budget, output, *, resume=False, weights=None, tokenizer=None,
                 overrides=()):
        self.budget, self.output, self.resume = budget, pathlib.Path(output), resume
        self.weights, self.tokenizer = weights, tokenizer
        self.overrides = tuple(budget.overrides) + tuple(overrides)
        self.logs = self.output / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.times = {}
        # Runs with the same program (the seeds of a strategy) compile it once.
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.output / "jax_cache"))

    def timed(self, name, times):
        entry = self.times.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] = round(entry["wall_s"] + times["wall_s"], 1)
        entry["cpu_s"] = round(entry["cpu_s"] + times["cpu_s"], 1)

    def done(self, path):
        return self.resume and pathlib.Path(path).exists()

    def seconds(self, wall_s, results):
        """Each phase's wall and CPU seconds and the total; on --resume, added to `results`' own.

        A study run in parts (--resume) then reports what all of it took, and in how many parts.
        """
        previous = json.loads(results.read_text())["seconds"] if self.done(results) else {}
        total = previous.pop("total", {"wall_s": 0.0, "parts": 0})
        for name, times in previous.items():
            self.timed(name, times)
        return dict(self.times, total={"wall_s": round(total["wall_s"] + wall_s, 1),
                                       "parts": total.get("parts", 1) + 1})  # fmt: skip

    # === Demonstrations and datasets ===

    def demonstrations(self, split, tasks, episodes):
        """Records and writes the dataset of `split`; returns `(expert summary, dataset info)`."""
        dataset, info_path = self.output / f"dataset_{split}", self.output / f"{split}.json"
        if self.done(info_path):
            info = json.loads(info_path.read_text())
            return info["expert"], info["dataset"]
        demos = self.output / f"demos_{split}"
        shutil.rmtree(demos, ignore_errors=True)
        self.timed("demonstrations", run(
            [
                sim_python(), HERE / "scripted_expert.py", "--tasks", *tasks, "--episodes",
                episodes, "--output", demos, "--image-size", *self.budget.image_size,
                "--workers", 2,
            ],
            self.logs / f"expert_{split}.log", self.budget.phase_timeout,
        ))
        expert = json.loads((demos / "summary.json").read_text())
        start = time.process_time(), time.time()
        root, count, frames = make_dataset(demos, dataset, overwrite=True)
        self.timed("datasets", {
            "wall_s": time.time() - start[1], "cpu_s": time.process_time() - start[0]
        })
        shutil.rmtree(demos)
        info = {"expert": expert, "dataset": {"path": str(root), "episodes": count,
                                              "frames": frames}}
        info_path.write_text(json.dumps(info, indent=1))
        print(f"wrote {root}: {count} episodes, {frames} frames", flush=True)
        return expert, info["dataset"]

    # === Training ===

    def train(self, run_dir, config, dataset, *, steps, seed, weights=None, norm_stats=None,
              strategy=None, schedule_of=None, phase="training"):
        """`keras-openpi train` of `config`; returns `{"steps", "final_loss", "export"}`."""
        export = run_dir / "export" / "policy.keras"
        summary_path = run_dir / "run.json"
        if self.done(summary_path):
            return json.loads(summary_path.read_text())
        settings = [f"data.path={dataset}", f"assets_dir={self.output / 'assets'}", f"seed={seed}"]
        if schedule_of:  # the scratch baseline trains on the fine-tuning schedule
            from keras_openpi.training import get_config

            optimizer = get_config(schedule_of).optimizer
            settings += [f"optimizer.{k}={v}" for k, v in dataclasses.asdict(optimizer).items()]
            settings += [f"num_train_steps={get_config(schedule_of).num_train_steps}"]
        settings += list(self.overrides)
        if steps:
            settings += [f"num_train_steps={steps}", f"optimizer.decay_steps={steps}"]
        if self.budget.batch_size:
            settings.append(f"batch_size={self.budget.batch_size}")
        if weights:
            settings.append(f"weights={weights}")
        if norm_stats:
            settings.append(f"data.norm_stats={norm_stats}")
        if strategy is not None:
            settings.append(f"strategy={json.dumps(strategy)}")
        if self.tokenizer:
            settings.append(f"tokenizer={self.tokenizer}")
        command = [sys.executable, "-m", "keras_openpi", "train", "--config", config]
        for setting in settings:
            command += ["--set", setting]
        times = run([*command, "--checkpoint-dir", run_dir, "--overwrite"],
                    self.logs / f"train_{run_dir.relative_to(self.output).as_posix().replace('/', '_')}.log",
                    self.budget.phase_timeout)
        self.timed(phase, times)
        from keras_openpi.training.callbacks import read_metrics

        metrics = read_metrics(run_dir / "metrics.csv")
        result = {"steps": metrics[-1]["step"], "final_loss": metrics[-1]["loss"],
                  "export": str(export), **times}
        summary_path.write_text(json.dumps(result, indent=1))
        return result

    # === Evaluation ===

    def evaluate(self, model, name, evaluations, frames=False, phase="evaluation"):
        """Serves `model` once and runs `evaluations` (`{key: (tasks, episodes)}`) against it;
        `frames` saves a strip of each task's first episode (`<output>/frames/<name>/`).

        Returns:
            `{key: evaluate.py's results}`.
        """
        paths = {key: self.output / "evals" / f"{name}_{key}.json" for key in evaluations}
        if all(self.done(p) for p in paths.values()):
            return {k: json.loads(p.read_text()) for k, p in paths.items()}
        paths[next(iter(paths))].parent.mkdir(parents=True, exist_ok=True)
        options = ["--tokenizer", self.tokenizer] if self.tokenizer else []
        results = {}
        with PolicyServer(model, self.logs / f"serve_{name}.log", "metaworld", options) as server:
            for key, (tasks, episodes) in evaluations.items():
                self.timed(phase, run(
                    [
                        sim_python(), HERE / "evaluate.py", "--port", server.port, "--tasks",
                        *tasks, "--episodes", episodes, "--max-steps", self.budget.eval_steps,
                        "--replan-steps", self.budget.replan_steps, "--image-size",
                        *self.budget.image_size, "--output", paths[key],
                        *(["--frames", self.output / "frames" / name] if frames else []),
                    ],
                    self.logs / f"evaluate_{name}_{key}.log", self.budget.phase_timeout,
                ))
                results[key] = json.loads(paths[key].read_text())
        # The server's start (its wall time) and all its CPU time (start and inference).
        self.timed("serving", {"wall_s": server.startup_s, "cpu_s": server.times["cpu_s"]})
        return results


def base_training(study, pretrain_dataset):
    """Trains (or, full budget, fine-tunes `pi0_base` into) the base on the pretraining tasks."""
    budget = study.budget
    return study.train(
        study.output / "base", budget.base_config, pretrain_dataset["path"],
        steps=budget.base_steps, seed=0, weights=study.weights, phase="base training",
    )


def finetune_runs(study, base, held_out_dataset):
    """Every (strategy, seed) run: training, then held-out and forgetting evaluations."""
    budget = study.budget
    base_export = pathlib.Path(base["export"])
    labels = [label for label, _ in budget.strategies] + ([SCRATCH] if budget.scratch else [])
    strategies = dict(budget.strategies)
    runs = {label: [] for label in labels}
    for seed in budget.seeds:
        for label in labels:
            run_dir = study.output / "runs" / label / f"seed{seed}"
            if label == SCRATCH:
                trained = study.train(
                    run_dir, budget.base_config, held_out_dataset["path"],
                    steps=budget.finetune_steps, seed=seed, weights=study.weights,
                    norm_stats=base_export.parent, schedule_of=budget.finetune_config,
                )
            else:
                trained = study.train(
                    run_dir, budget.finetune_config, held_out_dataset["path"],
                    steps=budget.finetune_steps, seed=seed, weights=base_export,
                    norm_stats=base_export.parent, strategy=strategies[label],
                )
            evaluations = {"held_out": (budget.held_out_tasks, budget.held_out_episodes)}
            if label != SCRATCH and seed in budget.forgetting_seeds:
                evaluations["forgetting"] = (budget.pretrain_tasks, budget.forgetting_episodes)
            results = study.evaluate(trained["export"], f"{label}_seed{seed}", evaluations,
                                     frames=seed == budget.seeds[0])
            runs[label].append({
                "seed": seed,
                "training": {k: v for k, v in trained.items() if k != "export"},
                "held_out": _brief(results["held_out"]),
                "forgetting": _brief(results.get("forgetting")),
            })
            print(
                f"{label} seed {seed}: held-out success "
                f"{results['held_out']['success_rate']:.2f}"
                + (f", pretraining tasks {results['forgetting']['success_rate']:.2f}"
                   if "forgetting" in results else ""),
                flush=True,
            )
    return runs


def _brief(evaluation):
    """An evaluation without its per-episode lists (they stay in `<output>/evals`)."""
    if evaluation is None:
        return None
    tasks = {
        name: {k: v for k, v in task.items() if k != "episode_results"}
        for name, task in evaluation["tasks"].items()
    }
    return {**{k: v for k, v in evaluation.items() if k != "tasks"}, "tasks": tasks}


def measure_costs(study, base):
    """`measure.py` over the strategies (scratch costs what `full` costs: the same program)."""
    budget = study.budget
    path = study.output / "costs.json"
    if study.done(path):
        return json.loads(path.read_text())
    command = [sys.executable, HERE / "measure.py", "--base", base["export"], "--config",
               budget.finetune_config, "--output", path]
    if budget.batch_size:
        command += ["--batch-size", budget.batch_size]
    strategies = list(budget.strategies)
    if budget.scratch and "full" not in dict(strategies):
        strategies.append(("full", {"name": "full"}))
    for label, strategy in strategies:
        command += ["--strategy", label, json.dumps(strategy)]
    study.timed("measurements", run(command, study.logs / "measure.log", budget.phase_timeout))
    return json.loads(path.read_text())


def run_study(budget, output, *, resume=False, weights=None, tokenizer=None, overrides=()):
    """Runs the whole study; returns the results dict (also written with its table and plot)."""
    study = Study(budget, output, resume=resume, weights=weights, tokenizer=tokenizer,
                  overrides=overrides)
    started = time.time()
    if SIM_PYTHON_ENV not in os.environ:
        study.timed("setup", run(["bash", HERE / "setup.sh"], study.logs / "setup.log"))
    if not sim_python().exists():
        raise FileNotFoundError(f"MetaWorld's python {sim_python()} is missing: run setup.sh.")

    pre_expert, pre_data = study.demonstrations("pretrain", budget.pretrain_tasks,
                                                budget.pretrain_demos)
    held_expert, held_data = study.demonstrations("held_out", budget.held_out_tasks,
                                                  budget.held_out_demos)
    base = base_training(study, pre_data)
    base_eval = study.evaluate(base["export"], "base", {
        "pretrain": (budget.pretrain_tasks, budget.base_episodes),
        "held_out": (budget.held_out_tasks, budget.held_out_episodes),
    }, frames=True)
    print(f"base policy: pretraining tasks {base_eval['pretrain']['success_rate']:.2f}, "
          f"held-out tasks {base_eval['held_out']['success_rate']:.2f}", flush=True)
    costs = measure_costs(study, base) if budget.measure else {}
    runs = finetune_runs(study, base, held_data)

    strategies = {}
    for label, label_runs in runs.items():
        cost = costs.get("full" if label == SCRATCH else label, {})
        evals = [json.loads((study.output / "evals" / f"{label}_seed{r['seed']}_held_out.json")
                            .read_text()) for r in label_runs]
        forgetting = [
            json.loads((study.output / "evals" / f"{label}_seed{r['seed']}_forgetting.json")
                       .read_text()) for r in label_runs if r["forgetting"] is not None
        ]
        strategies[label] = {
            "strategy": dict(budget.strategies).get(label, {"name": "full"}),
            "from": "scratch" if label == SCRATCH else "base",
            "trainable_params": cost.get("trainable_params"),
            "total_params": cost.get("total_params"),
            "train_step_bytes": cost.get("total_bytes"),
            "step_seconds": cost.get("step_seconds"),
            "step_ratio_to_matmul": cost.get("ratio_to_matmul"),
            "compile_seconds": cost.get("compile_seconds"),
            "held_out": pooled(evals),
            "held_out_per_seed": {r["seed"]: r["held_out"]["success_rate"] for r in label_runs},
            "forgetting": pooled(forgetting) if forgetting else None,
            "runs": label_runs,
        }
    results = {
        "budget": dataclasses.asdict(budget),
        "tasks": {"pretrain": list(budget.pretrain_tasks),
                  "held_out": list(budget.held_out_tasks)},
        "state": "proprioceptive: hand xyz and gripper opening (4 of MetaWorld's 39 numbers)",
        "expert": {"pretrain": pre_expert, "held_out": held_expert},
        "datasets": {"pretrain": pre_data, "held_out": held_data},
        "base": {
            "training": {k: v for k, v in base.items() if k != "export"},
            "pretrain": pooled([base_eval["pretrain"]]),
            "held_out": pooled([base_eval["held_out"]]),
        },
        "strategies": strategies,
        "costs": costs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg())},
    }
    path = pathlib.Path(budget.results) if budget.results else study.output / "metaworld.json"
    results["seconds"] = study.seconds(time.time() - started, path)
    table = write_report(results, path)
    results["table"], results["path"] = table, str(path)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--output", help="the study's directory (default outputs/metaworld/BUDGET)")
    parser.add_argument("--results", help="the results JSON (default: the budget's)")
    parser.add_argument("--resume", action="store_true", help="keep what a previous run finished")
    parser.add_argument("--weights", help="full budget: openpi's pi0_base params")
    parser.add_argument("--tokenizer", help="full budget: PaliGemma's tokenizer .model")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the training seeds")
    parser.add_argument("--base-steps", type=int, help="override the base's training steps")
    parser.add_argument("--finetune-steps", type=int, help="override the fine-tuning steps")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="more training settings for every run (keras-openpi train --set)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    budget = BUDGETS[args.budget]
    changes = {"results": args.results, "seeds": tuple(args.seeds) if args.seeds else None,
               "base_steps": args.base_steps, "finetune_steps": args.finetune_steps}
    budget = dataclasses.replace(budget, **{k: v for k, v in changes.items() if v is not None})
    if budget.name == "full" and not (args.weights and args.tokenizer):
        parser.error("the full budget starts from openpi's pi0_base: give --weights and --tokenizer")
    output = args.output or REPO / "outputs" / "metaworld" / budget.name
    results = run_study(budget, output, resume=args.resume, weights=args.weights,
                        tokenizer=args.tokenizer, overrides=args.set)
    print("\n" + results["table"])
    best = max(
        (s["held_out"]["success_rate"] for s in results["strategies"].values()), default=0.0
    )
    print(f"results {results['path']}; {results['seconds']['total']['wall_s']:.0f} s")
    print(f"held_out_best={best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
