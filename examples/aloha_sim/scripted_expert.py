"""A scripted expert for ALOHA transfer-cube, and the demonstrations it records.

Runs in the simulator's environment (`.venv-sim`). The expert plans gripper
waypoints from the cube's pose, the classic plan of the ALOHA/ACT work: the
right arm comes over the cube with its gripper tilted down, descends, grasps,
lifts and carries the cube to a meeting point above the table's centre; the
left arm arrives there turned towards it, closes on the cube, the right
gripper lets go and both arms back away.

The waypoints are interpolated every step (positions linearly, orientations
by slerp) and turned into joint targets by damped least-squares inverse
kinematics (`ArmKinematics`); the joint-space environment the policy will
control (`TransferCubeEnv`) executes them, and that is what gets recorded:
cameras, `agent_pos` and the 14-dim joint actions (the joint targets and the
gripper openings). An episode counts as a success when it reaches reward 4.
(ACT's expert drove gym-aloha's end-effector mocap scene and replayed its
joints; under MuJoCo 3 that scene no longer completes the task.)

    python scripted_expert.py --num-episodes 10 --output /tmp/demos --cameras top

writes `episode_000000.npz`, ... (`images.<camera>` (T, H, W, 3) uint8,
`state` (T, 14), `action` (T, 14), `reward` (T,), `seed`) and `summary.json`.
"""

import argparse
import itertools
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gym_aloha.constants import DT  # noqa: E402
from gym_aloha.constants import START_ARM_POSE  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from sim_env import MAX_REWARD  # noqa: E402
from sim_env import TransferCubeEnv  # noqa: E402
from sim_env import cube_pose  # noqa: E402
from sim_env import make_physics  # noqa: E402

EPISODE_STEPS = 400
# Where the two grippers meet (m, world frame: x right, y away from the viewer, z up).
MEET = np.array([0.0, 0.5, 0.25])
# The grasp point in the gripper link's frame: 13.5 cm along the gripper, between the
# fingers (where gym-aloha's end-effector scene welds its mocap targets).
GRASP_POINT = np.array([0.135, 0.0, 0.0])
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
# Metres of position error worth one radian of orientation error, in inverse kinematics.
ROTATION_WEIGHT = 0.1
# Inverse kinematics' pull of each arm joint towards zero (only the two roll joints).
POSTURE_WEIGHTS = np.array([0.0, 0.0, 0.0, 0.02, 0.0, 0.02])


def quaternion_about(axis, degrees):
    """The unit quaternion `(w, x, y, z)` of a rotation by `degrees` about `axis`."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * axis])


def quaternion_multiply(a, b):
    """Hamilton product `a * b` of `(w, x, y, z)` quaternions."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ]
    )


def slerp(a, b, fraction):
    """Spherical interpolation between unit quaternions `a` and `b`."""
    dot = float(np.dot(a, b))
    if dot < 0:
        b, dot = -b, -dot
    if dot > 0.9995:
        out = a + fraction * (b - a)
        return out / np.linalg.norm(out)
    angle = np.arccos(dot)
    return (np.sin((1 - fraction) * angle) * a + np.sin(fraction * angle) * b) / np.sin(angle)


def plan_waypoints(cube_xyz, left_start, right_start):
    """Waypoints `(step, xyz, quat, gripper)` of both arms for a cube at `cube_xyz`.

    Args:
        cube_xyz: the cube's position.
        left_start, right_start: each gripper's starting pose `(x, y, z, qw, qx, qy, qz)`.

    Returns:
        `(left, right)`: lists of `(step, xyz, quat, gripper)` with gripper in
        [0, 1] (0 closed, 1 open), the first at step 0 and the last at `EPISODE_STEPS`.
    """
    left_xyz, left_quat = left_start[:3], left_start[3:]
    right_xyz, right_quat = right_start[:3], right_start[3:]
    # Rotations in the world frame: the right gripper tilts 60° down towards the
    # table; the left one rolls 90° about its axis to grasp across the right's fingers.
    pick_quat = quaternion_multiply(quaternion_about([0, 1, 0], -60), right_quat)
    meet_quat = quaternion_multiply(quaternion_about([1, 0, 0], 90), left_quat)
    left_meet = MEET + [0.02, 0, -0.02]
    left_away = MEET + [-0.1, 0, -0.02]
    right = [
        (0, right_xyz, right_quat, 0.0),
        (90, cube_xyz + [0, 0, 0.08], pick_quat, 1.0),  # above the cube, open
        (130, cube_xyz + [0, 0, -0.015], pick_quat, 1.0),  # down around it
        (170, cube_xyz + [0, 0, -0.015], pick_quat, 0.0),  # grasp
        (200, MEET + [0.05, 0, 0], pick_quat, 0.0),  # lift and carry
        (220, MEET, pick_quat, 0.0),  # at the meeting point
        (310, MEET, pick_quat, 1.0),  # let go once the left gripper holds it
        (360, MEET + [0.1, 0, 0], pick_quat, 1.0),  # back away
        (EPISODE_STEPS, MEET + [0.1, 0, 0], pick_quat, 1.0),
    ]
    left = [
        (0, left_xyz, left_quat, 0.0),
        (100, left_away, meet_quat, 1.0),  # open, facing the meeting point
        (260, left_meet, meet_quat, 1.0),  # around the cube
        (310, left_meet, meet_quat, 0.0),  # grasp
        (360, left_away, meet_quat, 0.0),  # take it away
        (EPISODE_STEPS, left_away, meet_quat, 0.0),
    ]
    return left, right


def pose_at(waypoints, step):
    """The interpolated `(x, y, z, qw, qx, qy, qz, gripper)` of `waypoints` at `step`."""
    for (t0, xyz0, quat0, g0), (t1, xyz1, quat1, g1) in itertools.pairwise(waypoints):
        if t0 <= step <= t1:
            f = (step - t0) / (t1 - t0)
            xyz = (1 - f) * np.asarray(xyz0) + f * np.asarray(xyz1)
            quat = slerp(np.asarray(quat0, float), np.asarray(quat1, float), f)
            return np.concatenate([xyz, quat, [(1 - f) * g0 + f * g1]])
    raise ValueError(f"step {step} is outside the waypoints' steps 0..{waypoints[-1][0]}.")


class ArmKinematics:
    """Forward and inverse kinematics of one ViperX arm of gym-aloha's joint-space scene.

    Inverse kinematics is damped least squares on the grasp point's position
    and the gripper's orientation (MuJoCo's Jacobians), started from the
    previous solution and kept inside the joint limits.

    Args:
        physics: a dm_control `Physics` of the scene (only its model is used).
        arm: `left` or `right`.
    """

    def __init__(self, physics, arm):
        self.model = physics.model.ptr
        self.data = mujoco.MjData(self.model)
        joints = [self.model.joint(f"vx300s_{arm}/{name}") for name in ARM_JOINTS]
        self.qpos_index = np.array([j.qposadr[0] for j in joints])
        self.dof_index = np.array([j.dofadr[0] for j in joints])
        self.low, self.high = np.array([j.range for j in joints]).T
        self.body = self.model.body(f"vx300s_{arm}/gripper_link").id
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))

    def forward(self, q):
        """The grasp point's position and the gripper's orientation `(xyz, quat)` at joints `q`."""
        self.data.qpos[self.qpos_index] = q
        mujoco.mj_kinematics(self.model, self.data)
        rotation = self.data.xmat[self.body].reshape(3, 3)
        point = self.data.xpos[self.body] + rotation @ GRASP_POINT
        return point, self.data.xquat[self.body].copy()

    def inverse(self, q, xyz, quat, iterations=50, damping=0.05, tolerance=1e-4):
        """Joint angles near `q` that put the grasp point at `xyz`, the gripper turned to `quat`.

        Each iteration solves `min |J dq - e|² + damping² |dq|² + |P (q + dq)|²`,
        where `P` (`POSTURE_WEIGHTS`) softly holds the two roll joints at zero: the
        wrist starts near a singularity (both roll axes aligned) where plain damped
        least squares would reach an orientation by rolling the forearm half a
        turn, a posture the weak roll actuators of the scene do not follow.
        """
        q = np.array(q, dtype=np.float64)
        posture = np.diag(POSTURE_WEIGHTS**2)
        for _ in range(iterations):
            position, orientation = self.forward(q)
            error = np.concatenate(
                [xyz - position, ROTATION_WEIGHT * rotation_error(quat, orientation)]
            )
            if np.linalg.norm(error) < tolerance:
                break
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jac(self.model, self.data, self._jacp, self._jacr, position, self.body)
            jacobian = np.concatenate(
                [self._jacp[:, self.dof_index], ROTATION_WEIGHT * self._jacr[:, self.dof_index]]
            )
            normal = jacobian.T @ jacobian + damping**2 * np.eye(6) + posture
            step = np.linalg.solve(normal, jacobian.T @ error - posture @ q)
            q = np.clip(q + step, self.low, self.high)
        return q


def rotation_error(target, current):
    """The rotation vector (world frame) taking orientation `current` to `target`."""
    conjugate = current * np.array([1, -1, -1, -1])
    delta = quaternion_multiply(target, conjugate)
    if delta[0] < 0:
        delta = -delta
    sine = np.linalg.norm(delta[1:])
    if sine < 1e-9:
        return np.zeros(3)
    return 2 * np.arctan2(sine, delta[0]) * delta[1:] / sine


def plan_joint_actions(seed, steps=EPISODE_STEPS):
    """Joint-space actions of the waypoint plan for gym-aloha's cube of `seed`.

    Returns:
        (steps, 14) float32: per step both arms' joint targets (inverse
        kinematics of the interpolated gripper poses) and gripper openings.
    """
    physics = make_physics("bimanual_viperx_transfer_cube.xml")
    start = np.asarray(START_ARM_POSE)
    arms = {}
    for arm, offset in (("left", 0), ("right", 8)):
        kinematics = ArmKinematics(physics, arm)
        q0 = start[offset : offset + 6]
        arms[arm] = (kinematics, q0, np.concatenate(kinematics.forward(q0)))
    left, right = plan_waypoints(cube_pose(seed)[:3], arms["left"][2], arms["right"][2])
    plans = {"left": left, "right": right}
    actions = np.zeros((steps, 14), dtype=np.float32)
    for arm, offset in (("left", 0), ("right", 7)):
        kinematics, q, _ = arms[arm]
        for step in range(steps):
            pose = pose_at(plans[arm], step + 1)
            q = kinematics.inverse(q, pose[:3], pose[3:7])
            actions[step, offset : offset + 6] = q
            actions[step, offset + 6] = pose[7]
    return actions


def record_episode(seed, cameras=("top",), image_size=(224, 224), steps=EPISODE_STEPS):
    """One demonstration: the expert's joint actions replayed and recorded in `TransferCubeEnv`.

    Returns:
        dict with `images.<camera>` (T, H, W, 3) uint8, `state` (T, 14),
        `action` (T, 14), `reward` (T,), `seed`, and `max_reward` (4: success).
    """
    actions = plan_joint_actions(seed, steps)
    env = TransferCubeEnv(cameras, image_size)
    observation, _ = env.reset(seed=seed)
    frames = {name: [] for name in cameras}
    states, rewards = [], []
    for action in actions:
        for name in cameras:
            frames[name].append(observation["pixels"][name])
        states.append(observation["agent_pos"])
        observation, reward, _, _, _ = env.step(action)
        rewards.append(reward)
    episode = {f"images.{name}": np.stack(frames[name]) for name in cameras}
    episode.update(
        state=np.asarray(states, dtype=np.float32),
        action=actions,
        reward=np.asarray(rewards, dtype=np.float32),
        seed=np.int64(seed),
    )
    return episode, int(max(rewards))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-episodes", type=int, required=True)
    parser.add_argument("--output", required=True, help="directory for the episode .npz files")
    parser.add_argument("--seed", type=int, default=0, help="cube seed of the first episode")
    parser.add_argument("--cameras", nargs="+", default=["top"])
    parser.add_argument("--image-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=EPISODE_STEPS, help="steps per episode")
    args = parser.parse_args(argv)
    if args.num_episodes < 1 or not 1 <= args.steps <= EPISODE_STEPS:
        parser.error(f"need --num-episodes >= 1 and 1 <= --steps <= {EPISODE_STEPS}")
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for index in range(args.num_episodes):
        start, seed = time.time(), args.seed + index
        episode, max_reward = record_episode(seed, args.cameras, args.image_size, args.steps)
        np.savez(output / f"episode_{index:06d}.npz", **episode)
        results.append({"seed": seed, "max_reward": max_reward, "success": max_reward == MAX_REWARD})
        print(
            f"demo {index + 1}/{args.num_episodes}: seed {seed}, max reward {max_reward}, "
            f"{time.time() - start:.1f} s",
            flush=True,
        )
    summary = {
        "episodes": results,
        "success_rate": float(np.mean([r["success"] for r in results])),
        "cameras": list(args.cameras),
        "image_size": list(args.image_size),
        "fps": round(1 / DT),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"expert success rate {summary['success_rate']:.2f} over {len(results)} episodes")
    sys.stdout.flush()
    os._exit(0)  # dm_control's renderer teardown at interpreter exit only prints errors


if __name__ == "__main__":
    main()
