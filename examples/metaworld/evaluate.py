"""Closed-loop evaluation on MetaWorld tasks through openpi's client runtime, per task.

Runs in `.venv-metaworld` against a policy server (`keras-openpi serve MODEL --robot
metaworld`), the way openpi's examples drive a server: openpi-client's `Runtime` steps the
environment, a `PolicyAgent` asks an `ActionChunkBroker` for each action, and the broker
calls the server (`WebsocketClientPolicy`) once every `--replan-steps` steps for a new chunk.

    python evaluate.py --port 8000 --tasks drawer-open-v3 door-open-v3 --episodes 20 --output results.json

Episode `k` of a task is MetaWorld's task variation `k` of the evaluation split
(`sim_env.EVAL_SEED`, never a demonstration's); it ends at MetaWorld's `success` flag or after
`--max-steps` steps. The camera is rendered only on the steps whose observation the broker
sends (every `--replan-steps`-th); the state is read every step. Results per task: successes,
success rate, the steps of each episode; `--frames DIR` saves a strip of the first episode of
each task (`DIR/<task>.png`, 6 moments, 128 px).
"""

import argparse
import json
import logging
import os
import pathlib
import sys
import time

import numpy as np
from openpi_client import action_chunk_broker
from openpi_client import websocket_client_policy
from openpi_client.runtime import environment as _environment
from openpi_client.runtime import runtime as _runtime
from openpi_client.runtime import subscriber as _subscriber
from openpi_client.runtime.agents import policy_agent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from sim_env import DEFAULT_CAMERA  # noqa: E402
from sim_env import EVAL_SEED  # noqa: E402
from sim_env import MetaWorldTask  # noqa: E402
from tasks import check_tasks  # noqa: E402

STRIP_SIZE = (128, 128)
STRIP_MOMENTS = 6


class MetaWorldEnvironment(_environment.Environment):
    """A MetaWorld task as an openpi-client runtime environment.

    Observations are what `keras_openpi.data.robots.metaworld` expects:
    `{"observation/image": (H, W, 3) uint8, "observation/state": (4,), "prompt": str}`.

    Args:
        task: a `sim_env.MetaWorldTask`.
        first_seed: the split's first MT1 seed; episode `k` (counting resets) is variation `k`.
        max_steps: the episode's step limit.
        render_every: render the camera on steps `0, n, 2n, ...` only (the broker's requests).
        prompt: the instruction sent (default the task's).
    """

    def __init__(self, task, first_seed, max_steps, render_every=1, prompt=None):
        self.task, self.first_seed = task, first_seed
        self.max_steps, self.render_every = max_steps, max(1, render_every)
        self.prompt = prompt or task.prompt
        self.episodes, self.episode, self._image = 0, None, None

    def reset(self):
        seed, index = self.task.reset(self.first_seed, self.episodes)
        self.episodes += 1
        self.episode = {"seed": seed, "index": index, "steps": 0, "return": 0.0, "success": False}

    def is_episode_complete(self):
        return self.episode["success"] or self.episode["steps"] >= self.max_steps

    def get_observation(self):
        if self._image is None or self.episode["steps"] % self.render_every == 0:
            self._image = self.task.render()
        return {
            "observation/image": self._image,
            "observation/state": self.task.state,
            "prompt": self.prompt,
        }

    def apply_action(self, action):
        reward, success = self.task.step(action["actions"])
        self.episode["steps"] += 1
        self.episode["return"] += reward
        self.episode["success"] = success


class EpisodeLog(_subscriber.Subscriber):
    """Collects each episode's result, and logs it."""

    def __init__(self, environment):
        self.environment, self.episodes = environment, []

    def on_episode_start(self):
        self._start = time.time()

    def on_step(self, observation, action):
        pass

    def on_episode_end(self):
        episode = dict(self.environment.episode, seconds=round(time.time() - self._start, 2))
        episode["return"] = round(episode["return"], 2)
        self.episodes.append(episode)
        print(
            f"{self.environment.task.name} episode {len(self.episodes)}: variation "
            f"{episode['seed']}/{episode['index']}, {episode['steps']} steps, "
            f"{'success' if episode['success'] else 'failure'} ({episode['seconds']} s)",
            flush=True,
        )


class Strip(_subscriber.Subscriber):
    """Films the first episode at `STRIP_SIZE` and saves `STRIP_MOMENTS` evenly spaced frames."""

    def __init__(self, path, environment):
        self.path, self.environment, self.frames, self.done = path, environment, [], False

    def on_episode_start(self):
        pass

    def on_step(self, observation, action):
        if not self.done:
            self.frames.append(self.environment.task.render(STRIP_SIZE))

    def on_episode_end(self):
        if self.done or not self.frames:
            return
        import imageio

        picks = np.linspace(0, len(self.frames) - 1, STRIP_MOMENTS).round().astype(int)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        imageio.imwrite(self.path, np.concatenate([self.frames[i] for i in picks], axis=1))
        self.done, self.frames = True, []


def evaluate_task(policy, name, args):
    """Runs `args.episodes` episodes of task `name`; returns its results dict."""
    task = MetaWorldTask(name, tuple(args.image_size), args.camera)
    environment = MetaWorldEnvironment(task, args.seed, args.max_steps, args.replan_steps)
    log = EpisodeLog(environment)
    subscribers = [log]
    if args.frames:
        subscribers.append(Strip(pathlib.Path(args.frames) / f"{name}.png", environment))
    runtime = _runtime.Runtime(
        environment=environment,
        agent=policy_agent.PolicyAgent(
            policy=action_chunk_broker.ActionChunkBroker(policy, action_horizon=args.replan_steps)
        ),
        subscribers=subscribers,
        num_episodes=args.episodes,
    )
    start = time.time()
    runtime.run()
    episodes = log.episodes
    successes = sum(e["success"] for e in episodes)
    steps = [e["steps"] for e in episodes if e["success"]]
    return {
        "task": name,
        "prompt": task.prompt,
        "episodes": len(episodes),
        "successes": successes,
        "success_rate": successes / len(episodes),
        "mean_steps_to_success": float(np.mean(steps)) if steps else None,
        "steps": sum(e["steps"] for e in episodes),
        "seconds": round(time.time() - start, 1),
        "episode_results": episodes,
    }


def evaluate(args):
    """Evaluates every task; returns the results dict."""
    policy = websocket_client_policy.WebsocketClientPolicy(host=args.host, port=args.port)
    start = time.time()
    tasks = [evaluate_task(policy, name, args) for name in args.tasks]
    episodes = sum(t["episodes"] for t in tasks)
    return {
        "success_rate": float(np.mean([t["success_rate"] for t in tasks])),
        "successes": sum(t["successes"] for t in tasks),
        "episodes": episodes,
        "tasks": {t["task"]: t for t in tasks},
        "max_steps": args.max_steps,
        "replan_steps": args.replan_steps,
        "first_seed": args.seed,
        "server_metadata": policy.get_server_metadata(),
        "seconds": round(time.time() - start, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tasks", nargs="+", required=True, help="MT50 task names")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=200, help="step limit of an episode")
    parser.add_argument(
        "--replan-steps", type=int, default=5,
        help="actions executed from each chunk before asking for the next",
    )
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="the first MT1 seed")
    parser.add_argument("--image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--camera", default=DEFAULT_CAMERA)
    parser.add_argument("--frames", help="directory for a PNG strip of each task's first episode")
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        args.tasks = list(check_tasks(args.tasks))
    except ValueError as error:
        parser.error(str(error))
    if args.episodes < 1 or args.max_steps < 1 or args.replan_steps < 1:
        parser.error("--episodes, --max-steps and --replan-steps must be positive")
    logging.basicConfig(level=logging.WARNING)
    results = evaluate(args)
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(results, indent=1))
    rates = ", ".join(f"{k} {v['success_rate']:.2f}" for k, v in results["tasks"].items())
    print(
        f"success rate {results['success_rate']:.2f} over {results['episodes']} episodes ({rates})",
        flush=True,
    )
    os._exit(0)  # MuJoCo's EGL teardown at interpreter exit only prints errors


if __name__ == "__main__":
    main()
