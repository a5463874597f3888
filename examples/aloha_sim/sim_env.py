"""gym-aloha's transfer-cube task, rendered headless and fast, for demonstrations and evaluation.

Runs in the simulator's environment (`.venv-sim`, made by `setup.sh`): gym-aloha,
MuJoCo and dm_control, numpy < 2. It never imports keras_openpi.

`TransferCubeEnv` is gym-aloha's `AlohaEnv` (its physics, joint-space control,
reward and success) with two changes for CPU rendering:

- only the cameras asked for are rendered, at the size asked for (gym-aloha
  renders three 480x640 views every step and keeps one);
- shadows and multisampling are off (MuJoCo's 4096² shadow map costs ~50 ms a
  frame on a software renderer; without it a 224x224 frame takes ~8 ms).

The reward is gym-aloha's: 1 the right gripper touches the cube, 2 it lifted
it, 3 the left gripper touches it, 4 the left gripper holds it in the air
(success). Actions and `agent_pos` are 14 numbers: per arm 6 joint angles and a
gripper opening in [0, 1] (0 closed, 1 open), left arm first.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from dm_control import mujoco  # noqa: E402
from dm_control.rl import control  # noqa: E402
from gym_aloha import env as aloha_env  # noqa: E402
from gym_aloha.constants import ASSETS_DIR  # noqa: E402
from gym_aloha.constants import DT  # noqa: E402
from gym_aloha.tasks import sim as aloha_tasks  # noqa: E402
from gym_aloha.utils import sample_box_pose  # noqa: E402
from gymnasium import spaces  # noqa: E402

FPS = round(1 / DT)  # 50 Hz control
CAMERAS = ("top", "left_wrist", "right_wrist", "angle", "front_close")
MAX_REWARD = 4
TASK_PROMPT = "Transfer cube"


def make_physics(xml_name):
    """MuJoCo physics of a gym-aloha scene, with shadows and multisampling off."""
    physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml_name))
    physics.model.vis.quality.shadowsize = 0
    physics.model.vis.quality.offsamples = 0
    return physics


def render_cameras(physics, cameras, height, width):
    """`{camera: (height, width, 3) uint8}` of `physics` now."""
    return {name: physics.render(height=height, width=width, camera_id=name) for name in cameras}


def check_cameras(cameras):
    unknown = [name for name in cameras if name not in CAMERAS]
    if unknown or not cameras:
        raise ValueError(f"cameras must be among {CAMERAS}, got {list(cameras)}.")
    return tuple(cameras)


class _TransferCubeTask(aloha_tasks.TransferCubeTask):
    """gym-aloha's joint-space transfer-cube task, rendering only `cameras`."""

    def __init__(self, cameras, height, width):
        super().__init__()
        self.cameras, self.height, self.width = cameras, height, width

    def get_observation(self, physics):
        return {
            "qpos": self.get_qpos(physics),
            "qvel": self.get_qvel(physics),
            "env_state": self.get_env_state(physics),
            "images": render_cameras(physics, self.cameras, self.height, self.width),
        }


class TransferCubeEnv(aloha_env.AlohaEnv):
    """gym-aloha's `AlohaTransferCube-v0` (`pixels_agent_pos`) rendering `cameras` at `image_size`.

    Observations: `{"pixels": {camera: (H, W, 3) uint8}, "agent_pos": (14,)}`.
    `reset(seed=s)` places the cube as gym-aloha does (`sample_box_pose(s)`).

    Args:
        cameras: camera names among `CAMERAS` (`top` is ALOHA's `cam_high`).
        image_size: `(height, width)` of the rendered frames.

    Example:
    >>> env = TransferCubeEnv(("top",), (224, 224))
    >>> obs, info = env.reset(seed=0)
    >>> obs["pixels"]["top"].shape, obs["agent_pos"].shape
    ((224, 224, 3), (14,))
    """

    def __init__(self, cameras=("top",), image_size=(224, 224)):
        self.cameras = check_cameras(cameras)
        height, width = (int(x) for x in image_size)
        super().__init__(
            "transfer_cube",
            obs_type="pixels_agent_pos",
            observation_width=width,
            observation_height=height,
            visualization_width=width,
            visualization_height=height,
        )
        pixels = {
            name: spaces.Box(0, 255, shape=(height, width, 3), dtype=np.uint8)
            for name in self.cameras
        }
        self.observation_space["pixels"] = spaces.Dict(pixels)

    def _make_env_task(self, task_name):
        if task_name != "transfer_cube":
            raise ValueError(f"TransferCubeEnv runs transfer_cube, got {task_name!r}.")
        physics = make_physics("bimanual_viperx_transfer_cube.xml")
        task = _TransferCubeTask(self.cameras, self.observation_height, self.observation_width)
        return control.Environment(
            physics, task, float("inf"), control_timestep=DT, flat_observation=False
        )

    def _format_raw_obs(self, raw_obs):
        return {
            "pixels": {name: raw_obs["images"][name].copy() for name in self.cameras},
            "agent_pos": raw_obs["qpos"].copy(),
        }

    @property
    def physics(self):
        return self._env.physics


def cube_pose(seed):
    """gym-aloha's cube pose for `seed`: `(x, y, z, qw, qx, qy, qz)`."""
    return sample_box_pose(seed)
