"""Closed-loop evaluation in the ALOHA simulator through openpi's client runtime.

Runs in the simulator's environment (`.venv-sim`) against a policy server
(`keras-openpi serve MODEL --robot aloha`), the way openpi's
`examples/aloha_sim` drives its server: openpi-client's `Runtime` steps the
environment, a `PolicyAgent` asks an `ActionChunkBroker` for each action, and
the broker calls the server (`WebsocketClientPolicy`) once every
`--replan-steps` steps for a new action chunk.

    python evaluate.py --port 8000 --num-episodes 10 --output results.json --video episode.mp4

Each episode places the cube with its own seed (from `--seed` on, apart from
the demonstrations' seeds) and runs until the cube is transferred (reward 4)
or for `--max-steps` steps. Results: success rate, mean episode return (the
sum of the rewards) and mean maximum reward, per episode too. The best
episode (highest maximum reward) is saved as an MP4 filmed from the `angle`
camera, with a PNG of the moment it reached that reward.
"""

import argparse
import json
import logging
import os
import pathlib
import sys
import time

import imageio
import numpy as np
from openpi_client import action_chunk_broker
from openpi_client import websocket_client_policy
from openpi_client.runtime import environment as _environment
from openpi_client.runtime import runtime as _runtime
from openpi_client.runtime import subscriber as _subscriber
from openpi_client.runtime.agents import policy_agent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from sim_env import FPS  # noqa: E402
from sim_env import MAX_REWARD  # noqa: E402
from sim_env import TASK_PROMPT  # noqa: E402
from sim_env import TransferCubeEnv  # noqa: E402

# gym-aloha camera → ALOHA camera (keras_openpi.data.robots.aloha.EXPECTED_CAMERAS).
ALOHA_CAMERAS = {"top": "cam_high", "left_wrist": "cam_left_wrist", "right_wrist": "cam_right_wrist"}
EVAL_SEED = 100_000  # demonstrations use seeds 0, 1, ...


class AlohaSimEnvironment(_environment.Environment):
    """gym-aloha's transfer cube as an openpi-client runtime environment.

    Observations are what an ALOHA robot sends openpi's policy server:
    `{"state": (14,), "images": {"cam_high": (3, H, W) uint8, ...}, "prompt": ...}`.
    Episode `i` (counting resets) places the cube with seed `seed + i`.

    Args:
        seed: the first episode's cube seed.
        cameras: gym-aloha cameras to send (keys of `ALOHA_CAMERAS`).
        image_size: `(height, width)` rendered (that of the training data).
        max_steps: the episode's step limit.
        prompt: the task instruction sent with each observation.
    """

    def __init__(self, seed, cameras, image_size, max_steps, prompt=TASK_PROMPT):
        unknown = [name for name in cameras if name not in ALOHA_CAMERAS]
        if unknown:
            raise ValueError(f"cameras must be among {sorted(ALOHA_CAMERAS)}, got {cameras}.")
        self._env = TransferCubeEnv(cameras, image_size)
        self._seed, self._episodes = seed, 0
        self.max_steps, self.prompt = max_steps, prompt
        self.episode = None

    def reset(self):
        seed = self._seed + self._episodes
        self._episodes += 1
        observation, _ = self._env.reset(seed=seed)
        self._observation = self._convert(observation)
        self.episode = {"seed": seed, "steps": 0, "return": 0.0, "max_reward": 0}

    def is_episode_complete(self):
        return self.episode["max_reward"] == MAX_REWARD or self.episode["steps"] >= self.max_steps

    def get_observation(self):
        return self._observation

    def apply_action(self, action):
        observation, reward, _, _, _ = self._env.step(np.asarray(action["actions"]))
        self._observation = self._convert(observation)
        self.episode["steps"] += 1
        self.episode["return"] += float(reward)
        self.episode["max_reward"] = max(self.episode["max_reward"], int(reward))

    def render(self, camera, height, width):
        """A `(height, width, 3)` uint8 frame of the scene now, from `camera`."""
        return self._env.physics.render(height=height, width=width, camera_id=camera)

    def _convert(self, observation):
        return {
            "state": observation["agent_pos"].astype(np.float32),
            "images": {
                ALOHA_CAMERAS[name]: np.ascontiguousarray(image.transpose(2, 0, 1))
                for name, image in observation["pixels"].items()
            },
            "prompt": self.prompt,
        }


class EpisodeLog(_subscriber.Subscriber):
    """Collects each episode's result from the environment, and logs it."""

    def __init__(self, environment):
        self.environment = environment
        self.episodes = []

    def on_episode_start(self):
        self._start = time.time()

    def on_step(self, observation, action):
        pass

    def on_episode_end(self):
        episode = dict(self.environment.episode)
        episode["success"] = episode["max_reward"] == MAX_REWARD
        episode["seconds"] = round(time.time() - self._start, 2)
        self.episodes.append(episode)
        print(
            f"episode {len(self.episodes)}: seed {episode['seed']}, {episode['steps']} steps, "
            f"max reward {episode['max_reward']}, return {episode['return']:.0f}, "
            f"{'success' if episode['success'] else 'failure'} ({episode['seconds']} s)",
            flush=True,
        )


class VideoSaver(_subscriber.Subscriber):
    """Films every episode with one camera and keeps the best one: an MP4 and one PNG.

    The best episode is the one with the highest maximum reward (the first of
    equals); the PNG (the video's path with `.png`) is its frame at the moment
    it first reached that reward: the transfer itself in a successful episode.

    Args:
        path: the MP4 file.
        environment: the `AlohaSimEnvironment` (its physics is rendered).
        camera: the camera filmed (default `angle`: the table seen from the front).
        size: `(height, width)` of the video.
    """

    def __init__(self, path, environment, camera="angle", size=(240, 320)):
        self.path = pathlib.Path(path)
        self.environment, self.camera, self.size = environment, camera, size
        self.episodes, self.kept = 0, None

    def on_episode_start(self):
        self.frames, self.reward, self.frame = [], -1, None

    def on_step(self, observation, action):
        frame = self.environment.render(self.camera, *self.size)
        self.frames.append(frame)
        reward = self.environment.episode["max_reward"]
        if reward > self.reward:
            self.reward, self.frame = reward, frame

    def on_episode_end(self):
        self.episodes += 1
        if not self.frames or (self.kept is not None and self.reward <= self.kept["max_reward"]):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimwrite(self.path, self.frames, fps=FPS, macro_block_size=1)
        imageio.imwrite(self.path.with_suffix(".png"), self.frame)
        self.kept = {"episode": self.episodes, "max_reward": self.reward}


def evaluate(args):
    """Runs the episodes; returns the results dict."""
    environment = AlohaSimEnvironment(
        args.seed, args.cameras, args.image_size, args.max_steps, args.prompt
    )
    policy = websocket_client_policy.WebsocketClientPolicy(host=args.host, port=args.port)
    log = EpisodeLog(environment)
    video = VideoSaver(args.video, environment) if args.video else None
    subscribers = [log] + ([video] if video else [])
    runtime = _runtime.Runtime(
        environment=environment,
        agent=policy_agent.PolicyAgent(
            policy=action_chunk_broker.ActionChunkBroker(policy, action_horizon=args.replan_steps)
        ),
        subscribers=subscribers,
        num_episodes=args.num_episodes,
    )
    start = time.time()
    runtime.run()
    episodes = log.episodes
    return {
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "mean_return": float(np.mean([e["return"] for e in episodes])),
        "mean_max_reward": float(np.mean([e["max_reward"] for e in episodes])),
        "num_episodes": len(episodes),
        "max_steps": args.max_steps,
        "replan_steps": args.replan_steps,
        "server_metadata": policy.get_server_metadata(),
        "video": str(args.video) if args.video else None,
        "frame": str(pathlib.Path(args.video).with_suffix(".png")) if args.video else None,
        "video_episode": video.kept["episode"] if video else None,
        "seconds": round(time.time() - start, 1),
        "episodes": episodes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-episodes", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=400, help="steps per episode (8 s)")
    parser.add_argument(
        "--replan-steps", type=int, default=10,
        help="actions executed from each chunk before asking for the next (openpi's 10)",
    )
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="the first episode's cube seed")
    parser.add_argument("--cameras", nargs="+", default=["top"])
    parser.add_argument("--image-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--prompt", default=TASK_PROMPT)
    parser.add_argument("--video", help="MP4 file for the best episode (and a PNG next to it)")
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.num_episodes < 1 or args.max_steps < 1 or args.replan_steps < 1:
        parser.error("--num-episodes, --max-steps and --replan-steps must be positive")
    logging.basicConfig(level=logging.WARNING)
    results = evaluate(args)
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(results, indent=1))
    print(
        f"success rate {results['success_rate']:.2f} over {results['num_episodes']} episodes, "
        f"mean return {results['mean_return']:.1f}, mean max reward {results['mean_max_reward']:.2f}"
    )
    sys.stdout.flush()
    os._exit(0)  # dm_control's renderer teardown at interpreter exit only prints errors


if __name__ == "__main__":
    main()
