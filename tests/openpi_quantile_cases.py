"""The inputs of the openpi quantile fixture (tests/fixtures/openpi_quantiles/).

Shared by the fixture's generator, which runs openpi's `RunningStats` on them
under numpy 1.26, and by tests/test_openpi_running_stats.py. The values come
from integer hashing and exact float operations only (no random generator, no
libm), so every numpy version builds the same arrays bit for bit.
"""

import numpy as np


def uniform(shape, seed):
    """Floats in [0, 1) from splitmix64 of the element index (exact on any platform)."""
    with np.errstate(over="ignore"):
        z = np.arange(int(np.prod(shape)), dtype=np.uint64)
        z = z + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) / 2.0**53).reshape(shape)


def robot_like(rows, seed):
    """(rows, 6) float64: random-walk joints, a gripper, a constant, a heavy tail, an offset."""
    u = uniform((rows, 6, 4), seed)
    bell = u.sum(axis=-1) - 2.0  # Irwin-Hall: roughly normal, std 0.58
    out = np.empty((rows, 6))
    out[:, 0] = np.cumsum(0.05 * bell[:, 0])  # a joint drifting: the range keeps growing
    out[:, 1] = 0.3 * bell[:, 1]
    out[:, 2] = (u[:, 2, 0] > 0.7).astype(np.float64)  # a binary gripper
    out[:, 3] = 0.25  # a constant dimension
    out[:, 4] = 0.01 / (u[:, 4, 0] + 0.001)  # heavy tail
    out[:, 5] = 1000.0 + 2.0 * bell[:, 5]  # a large offset
    return out


def batches(data, batch_size):
    """`data` split into consecutive batches of `batch_size` rows (the last one may be short)."""
    return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]


def cases():
    """`{name: list of update batches}`, each batch as openpi's `RunningStats.update` gets it."""
    arange = np.arange(12).reshape(4, 3)
    chunks = robot_like(6 * 8 * 10, seed=3).astype(np.float32).reshape(6, 8, 10, 6)[..., :3]
    constants = np.stack(
        [np.full(64, 1e7), np.zeros(64), np.arange(64) % 2, uniform((64,), 9)], axis=1
    )
    return {
        # openpi's own edge case: one update, q99 is 8.998 where np.quantile gives 8.91.
        "arange_one_batch": [arange],
        # openpi's unit test: one vector at a time (every update re-bins).
        "arange_row_by_row": [arange[i : i + 1] for i in range(4)],
        # float32 states in batches of 32, as openpi's loader gives them.
        "float32_batches_of_32": batches(robot_like(320, seed=1).astype(np.float32), 32),
        # float32 action chunks (B, H, d): every step is a vector.
        "action_chunks": list(chunks),
        # float64 batches of uneven sizes.
        "float64_uneven_batches": [
            part for part in np.split(robot_like(200, seed=2), [7, 20, 70, 150])
        ],
        # Constant dims (1e7: the 1e-10 margin vanishes; 0), a 0/1 dim, a uniform dim.
        "constant_dims": batches(constants.astype(np.float32), 16),
        # 20,000 float32 rows in batches of 32 (625 updates).
        "rows_20k": batches(robot_like(20_000, seed=4).astype(np.float32), 32),
    }
