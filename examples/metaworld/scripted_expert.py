"""Demonstrations of MetaWorld tasks by MetaWorld's scripted experts (`metaworld.policies`).

Runs in `.venv-metaworld`. For each task, episodes 0, 1, ... of the demonstration split
(`sim_env.DEMO_SEED`: MetaWorld's own task variations) are run by the task's expert until
`--episodes` of them succeed (MetaWorld's `success` flag); each episode stops at its first
success. Only successful episodes are saved, one `.npz` each:

    image (T, H, W, 3) uint8, state (T, 4), environment_state (T, 39), action (T, 4),
    reward (T,), task, prompt, seed, index (the MT1 seed and variation)

`summary.json` holds each task's attempts, successes and success rate: the expert's own.

    python scripted_expert.py --tasks drawer-open-v3 door-open-v3 --episodes 20 --output /tmp/demos
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from sim_env import DEFAULT_CAMERA  # noqa: E402
from sim_env import DEMO_SEED  # noqa: E402
from sim_env import FPS  # noqa: E402
from sim_env import MetaWorldTask  # noqa: E402
from sim_env import expert_policy  # noqa: E402
from tasks import check_tasks  # noqa: E402


def run_expert(task, policy, first_seed, episode, max_steps):
    """One expert episode; returns `(frames dict, success, steps)`; frames stop at the success."""
    seed, index = task.reset(first_seed, episode)
    frames = {"image": [], "state": [], "environment_state": [], "action": [], "reward": []}
    success = False
    for _ in range(max_steps):
        action = np.clip(policy.get_action(task.observation), -1.0, 1.0).astype(np.float32)
        frames["image"].append(task.render())
        frames["state"].append(task.state)
        frames["environment_state"].append(task.observation.astype(np.float32))
        frames["action"].append(action)
        reward, success = task.step(action)
        frames["reward"].append(np.float32(reward))
        if success:
            break
    arrays = {key: np.stack(values) for key, values in frames.items()}
    arrays.update(task=task.name, prompt=task.prompt, seed=seed, index=index)
    return arrays, success, len(frames["action"])


def record_task(name, args):
    """Records `args.episodes` successful episodes of task `name`; returns its summary."""
    task = MetaWorldTask(name, tuple(args.image_size), args.camera)
    policy = expert_policy(name)
    max_attempts = args.max_attempts or 2 * args.episodes + 5
    kept, attempts, lengths, start = 0, 0, [], time.time()
    while kept < args.episodes and attempts < max_attempts:
        arrays, success, steps = run_expert(task, policy, args.seed, attempts, args.max_steps)
        attempts += 1
        if success:
            path = pathlib.Path(args.output) / f"{name}_{kept:04d}.npz"
            np.savez(path, **arrays)
            kept += 1
            lengths.append(steps)
    summary = {
        "task": name,
        "prompt": task.prompt,
        "attempts": attempts,
        "successes": kept,
        "success_rate": kept / attempts,
        "mean_steps": float(np.mean(lengths)) if lengths else None,
        "max_steps": int(max(lengths)) if lengths else None,
        "seconds": round(time.time() - start, 1),
    }
    print(
        f"{name}: expert success {kept}/{attempts}, {summary['mean_steps'] or 0:.0f} steps on "
        f"average ({summary['seconds']} s)",
        flush=True,
    )
    return summary


def _worker(names, args, queue):
    try:
        queue.put([record_task(name, args) for name in names])
    except BaseException as error:  # the parent reports it
        queue.put(f"{type(error).__name__}: {error}")
    queue.close()
    queue.join_thread()  # the result is sent before the process ends
    sys.stdout.flush()
    os._exit(0)  # skip MuJoCo's EGL teardown at exit (it only prints errors)


def record(args):
    """Records every task, over `args.workers` processes; returns the summary dict."""
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.time()
    workers = max(1, min(args.workers, len(args.tasks)))
    if workers == 1:
        tasks = [record_task(name, args) for name in args.tasks]
    else:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        shares = [args.tasks[i::workers] for i in range(workers)]
        processes = [context.Process(target=_worker, args=(s, args, queue)) for s in shares]
        for process in processes:
            process.start()
        results = [queue.get() for _ in processes]
        for process in processes:
            process.join()
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            raise RuntimeError(f"a recording worker failed: {errors[0]}")
        by_name = {s["task"]: s for r in results for s in r}
        tasks = [by_name[name] for name in args.tasks]
    attempts = sum(t["attempts"] for t in tasks)
    successes = sum(t["successes"] for t in tasks)
    summary = {
        "fps": FPS,
        "camera": args.camera,
        "image_size": list(args.image_size),
        "first_seed": args.seed,
        "episodes_per_task": args.episodes,
        "success_rate": successes / attempts,
        "attempts": attempts,
        "successes": successes,
        "tasks": tasks,
        "seconds": round(time.time() - start, 1),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", required=True, help="MT50 task names")
    parser.add_argument("--episodes", type=int, default=20, help="successful episodes per task")
    parser.add_argument(
        "--max-attempts", type=int, help="episodes tried per task (default 2 x episodes + 5)"
    )
    parser.add_argument("--output", required=True, help="directory for the .npz files")
    parser.add_argument("--image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--camera", default=DEFAULT_CAMERA)
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="the first MT1 seed")
    parser.add_argument("--max-steps", type=int, default=500, help="MetaWorld's episode limit")
    parser.add_argument("--workers", type=int, default=1, help="processes recording tasks")
    args = parser.parse_args(argv)
    try:
        args.tasks = list(check_tasks(args.tasks))
    except ValueError as error:
        parser.error(str(error))
    if args.episodes < 1 or args.max_steps < 1 or args.workers < 1:
        parser.error("--episodes, --max-steps and --workers must be positive")
    summary = record(args)
    print(
        f"expert success rate {summary['success_rate']:.2f} ({summary['successes']}/"
        f"{summary['attempts']} episodes, {len(summary['tasks'])} tasks, {summary['seconds']} s)",
        flush=True,
    )
    os._exit(0)


if __name__ == "__main__":
    main()
