"""MetaWorld tasks with a small rendered camera and the proprioceptive state (`.venv-metaworld`).

Each episode is one of MetaWorld's own task variations: `metaworld.MT1(name, seed=s)` draws 50
(object and goal positions from the task's random reset space, as MT10 / MT50 draw them), and
episode `k` of a split starting at seed `s0` is variation `k % 50` of `MT1(name, seed=s0 + k //
50)`. Demonstrations and evaluations use different seeds, so they never share a variation.

What a policy gets (the keys of `keras_openpi.data.robots.metaworld`):

    observation/image  (H, W, 3) uint8   the `camera` (default `corner4`: the workspace seen
                                         from the front right, gripper and object in view),
                                         turned right side up (MetaWorld's cameras render
                                         upside down)
    observation/state  (4,) float32      the hand's position (m) and the gripper's opening
                                         in [0, 1]: the first 4 of MetaWorld's 39 numbers
    prompt             str               the task's instruction (`tasks.PROMPTS`)

The other 35 numbers (object positions and orientations, the previous frame's, the goal) are
kept as `environment_state` for the record, not given to the policy. Actions: 4 numbers in
[-1, 1], the hand's displacement (x 1 cm a step) and the gripper's effort (+1 closes).
Rendering: MuJoCo's `Renderer` with shadows and multisampling off (headless with
`MUJOCO_GL=egl`).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from tasks import PROMPTS  # noqa: E402
from tasks import check_tasks  # noqa: E402

FPS = 80  # MetaWorld's control rate: 5 MuJoCo steps of 2.5 ms
STATE_DIM = 4
ACTION_DIM = 4
VARIATIONS_PER_SEED = 50  # MetaWorld's `_N_GOALS`
DEMO_SEED = 0  # demonstrations: MT1 seeds 0, 1, ...
EVAL_SEED = 100_000  # evaluations: MT1 seeds 100000, 100001, ...
DEFAULT_CAMERA = "corner4"


class MetaWorldTask:
    """One MetaWorld task: its environment, its variations, its scripted expert, its camera.

    Args:
        name: an MT50 task name (`drawer-open-v3`).
        image_size: `(height, width)` rendered.
        camera: a MetaWorld camera (`corner4`, `corner`, `corner2`, `corner3`, `topview`, ...).
    """

    def __init__(self, name, image_size=(64, 64), camera=DEFAULT_CAMERA):
        import metaworld
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        check_tasks([name])
        self.name, self.prompt = name, PROMPTS[name]
        self.image_size, self.camera = tuple(image_size), camera
        self._metaworld = metaworld
        self.env = ALL_V3_ENVIRONMENTS[name]()
        self.env.model.vis.quality.shadowsize = 0
        self.env.model.vis.quality.offsamples = 0
        if mujoco.mj_name2id(self.env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
            raise ValueError(f"MetaWorld has no camera {camera!r} (try corner4, corner, topview).")
        self._renderers = {self.image_size: mujoco.Renderer(self.env.model, *self.image_size)}
        self._variations = {}
        self.observation = None

    def variation(self, first_seed, episode):
        """`(seed, index, Task)` of episode `episode` of the split starting at MT1 seed `first_seed`."""
        seed, index = first_seed + episode // VARIATIONS_PER_SEED, episode % VARIATIONS_PER_SEED
        if seed not in self._variations:
            self._variations[seed] = self._metaworld.MT1(self.name, seed=seed).train_tasks
        return seed, index, self._variations[seed][index]

    def reset(self, first_seed, episode):
        """Starts episode `episode` of the split at `first_seed`; returns its `(seed, index)`."""
        seed, index, task = self.variation(first_seed, episode)
        self.env.set_task(task)
        self.observation, _ = self.env.reset()
        return seed, index

    def step(self, action):
        """Applies a 4-d action; returns `(reward, success)`."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"a MetaWorld action is 4 finite numbers, got {action!r}.")
        self.observation, reward, _, _, info = self.env.step(np.clip(action, -1.0, 1.0))
        return float(reward), bool(info["success"])

    @property
    def state(self):
        """The proprioceptive state (4,): hand xyz and gripper opening."""
        return self.observation[:STATE_DIM].astype(np.float32)

    def render(self, size=None, camera=None):
        """The camera's image now, right side up: `(H, W, 3)` uint8 (default size: `image_size`)."""
        size = tuple(size or self.image_size)
        if size not in self._renderers:
            import mujoco

            self._renderers[size] = mujoco.Renderer(self.env.model, *size)
        renderer = self._renderers[size]
        renderer.update_scene(self.env.data, camera=camera or self.camera)
        return np.ascontiguousarray(renderer.render()[::-1, ::-1])


def expert_policy(name):
    """MetaWorld's scripted expert of task `name` (`metaworld.policies.ENV_POLICY_MAP`)."""
    import warnings

    from metaworld.policies import ENV_POLICY_MAP

    check_tasks([name])
    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
    return ENV_POLICY_MAP[name]()
