"""The procedural reach task (`procedural.py`) as a random-access source of frames.

Sample `i` is one frame in the model's camera layout (robot `raw`):
`{"image": {camera: (S, S, 3) uint8}, "image_mask": {camera: True}, "state":
(3,) float32, "actions": (H, 3) float32, "actions_is_pad": (H,) bool,
"prompt": str, "episode_index", "frame_index"}`, with the action chunk
padded by repeating the last action, as LeRobot and openpi do.
"""

import numpy as np

from keras_openpi.data.procedural import CAMERAS
from keras_openpi.data.procedural import make_reach_episode
from keras_openpi.data.procedural import render_cameras

# Keys of a procedural dataset saved with `lerobot_episodes` → the `raw` robot's keys.
LEROBOT_REPACK = {
    "image": {camera: f"observation.images.{camera}" for camera in CAMERAS},
    "state": "observation.state",
    "actions": "action",
    "prompt": "prompt",
}
FPS = 10


class ProceduralDataset:
    """Frames of `num_episodes` reach episodes, rendered on access.

    Episode `i` is `make_reach_episode(seed, start + i)`: the same frames as
    the demo's. Only the plans (objects, states) are kept in memory.

    Args:
        num_episodes: how many episodes.
        seed: dataset seed.
        start: index of the first episode (disjoint splits of one seed).
        image_size: side of every camera image.
        action_horizon: H, the length of each action chunk.
        num_objects: shapes on the table.

    Example:
    >>> data = ProceduralDataset(2, image_size=32, action_horizon=4)
    >>> len(data), data[0]["actions"].shape, data[0]["image"]["base_0_rgb"].shape
    (35, (4, 3), (32, 32, 3))
    """

    def __init__(
        self, num_episodes, seed=0, start=0, image_size=96, action_horizon=10, num_objects=3
    ):
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be at least 1, got {num_episodes}.")
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be at least 1, got {action_horizon}.")
        self.image_size = image_size
        self.action_horizon = action_horizon
        self.fps = FPS
        # Rendering 2x2 images keeps the episode's plan (the rng draws do not depend on the size).
        self._plans = [
            make_reach_episode(seed, start + i, image_size=2, num_objects=num_objects)
            for i in range(num_episodes)
        ]
        lengths = [len(plan["state"]) for plan in self._plans]
        self._starts = np.cumsum([0] + lengths)

    def __len__(self):
        return int(self._starts[-1])

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames.")
        index %= len(self)
        episode = int(np.searchsorted(self._starts, index, side="right") - 1)
        plan, frame = self._plans[episode], index - int(self._starts[episode])
        length = len(plan["state"])
        wanted = frame + np.arange(self.action_horizon)
        state = plan["state"][frame]
        return {
            "image": render_cameras(plan["objects"], state[:2], state[2], self.image_size),
            "image_mask": {camera: np.True_ for camera in CAMERAS},
            "state": state,
            "actions": plan["actions"][np.minimum(wanted, length - 1)],
            "actions_is_pad": wanted >= length,
            "prompt": plan["prompt"],
            "episode_index": np.int64(episode),
            "frame_index": np.int64(frame),
        }

    def lerobot_episodes(self):
        """The episodes as `LeRobotWriter` takes them (`observation.images.<camera>`, ...)."""
        for plan in self._plans:
            frames = [
                render_cameras(plan["objects"], s[:2], s[2], self.image_size) for s in plan["state"]
            ]
            episode = {
                f"observation.images.{camera}": np.stack([f[camera] for f in frames])
                for camera in CAMERAS
            }
            episode["observation.state"] = plan["state"]
            episode["action"] = plan["actions"]
            episode["task"] = plan["prompt"]
            yield episode
