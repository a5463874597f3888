"""Several processes (JAX's multi-controller runtime): start-up, barriers, agreement, finite checks.

One process per host (or per GPU) runs the same program; `initialize`
joins them through `keras.distribution.initialize` (which calls
`jax.distributed.initialize`) before anything touches a device. Afterwards
`keras.distribution.list_devices()` lists every process's devices, and
the helpers here are collective: every process calls them, in the same order.
On one process, or another backend than JAX, they are no-ops.

JAX reads `JAX_COORDINATOR_ADDRESS` and finds the rest on SLURM
(`SLURM_NTASKS`, `SLURM_PROCID`, ... of an `srun` step), Open MPI
(`mpirun`) and Cloud TPU; Keras reads `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
`KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`.
"""

import os

import keras
import numpy as np

# The launches `initialize` recognizes from the environment (variable, what it means).
_KERAS_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


def _jax():
    return keras.backend.backend() == "jax"


def launched_processes(environ=None):
    """How many processes the environment says were launched together (1: none).

    Counts an `srun` step of several tasks (SLURM), an `mpirun` of several
    ranks (Open MPI), or Keras' `KERAS_DISTRIBUTION_NUM_PROCESSES`.

    Example:
    >>> launched_processes({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7",
    ...                     "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_LOCALID": "1"})
    4
    >>> launched_processes({})
    1
    """
    environ = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    candidates = [environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")]
    if all(name in environ for name in slurm):
        candidates.append(environ["SLURM_NTASKS"])
    if "OMPI_MCA_orte_hnp_uri" in environ:
        candidates.append(environ.get("OMPI_COMM_WORLD_SIZE"))
    counts = [int(c) for c in candidates if c and str(c).isdigit()]
    return max(counts, default=1)


def initialize(coordinator=None, num_processes=None, process_id=None, environ=None):
    """Joins this process to the others of a multi-process run; returns the process count.

    Nothing is done (1 is returned) unless a flag is given or the
    environment is a launch of several processes (`launched_processes`);
    `num_processes=1` keeps a single process even then. A second call in
    the same process returns the count of the first.

    Args:
        coordinator: `HOST:PORT` of process 0 (None: from the environment).
        num_processes: how many processes take part (None: from the environment).
        process_id: this process's index in `[0, num_processes)` (None: from the environment).
        environ: the environment (default `os.environ`).

    Raises:
        ValueError: a flag is malformed, or the backend is not JAX.
    """
    environ = os.environ if environ is None else environ
    if num_processes is not None and int(num_processes) < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}.")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"--process-id {process_id} with --num-processes 1: use 0.")
        return 1
    given = (coordinator, num_processes, process_id) != (None, None, None)
    launched = launched_processes(environ) > 1 or "KERAS_DISTRIBUTION_PROCESS_ID" in environ
    if not given and not launched:
        return 1
    if not launched and (process_id is not None or coordinator is not None):
        missing = [
            flag
            for flag, value in (("--num-processes", num_processes), ("--process-id", process_id))
            if value is None
        ]
        if missing:
            raise ValueError(
                f"several processes need {' and '.join(missing)} too (or a launcher JAX reads, "
                "such as srun or mpirun): give every process the same --coordinator and "
                "--num-processes and its own --process-id."
            )
    if num_processes is not None and process_id is not None:
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(
                f"--process-id must be in [0, {num_processes}) for --num-processes "
                f"{num_processes}, got {process_id}."
            )
    if coordinator is not None and (
        ":" not in coordinator or not coordinator.rsplit(":")[-1].isdigit()
    ):
        raise ValueError(f"--coordinator takes HOST:PORT (process 0's), got {coordinator!r}.")
    if not _jax():
        raise ValueError(
            f"several processes need keras.distribution, which the {keras.backend.backend()!r} "
            "backend does not have: train with KERAS_BACKEND=jax."
        )
    import jax

    if jax.distributed.is_initialized():
        return jax.process_count()
    if jax.config.jax_cpu_collectives_implementation is None:
        # CPU devices of several processes talk through gloo (JAX's default since 0.5).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=coordinator,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id),
    )
    return jax.process_count()


def process_index():
    """This process's index (0 on one process)."""
    if _jax():
        import jax

        return jax.process_index()
    return 0


def process_count():
    """How many processes run the program (1 on one process)."""
    if _jax():
        import jax

        return jax.process_count()
    return 1


def sync(name):
    """Waits until every process has reached the barrier `name` (a no-op on one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_int(value):
    """Process 0's `value` (an int), on every process."""
    if process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def _is_float(value):
    return "float" in keras.backend.standardize_dtype(value.dtype)


_ALL_FINITE = None


def finite_flags(values):
    """Whether each float array of `values` holds only finite numbers (a list of bools).

    Computed where the arrays are (one compiled reduction on JAX, where a
    sharded array never comes to one host); every process gets the flags.
    """
    global _ALL_FINITE
    flags = [True] * len(values)
    floats = [i for i, value in enumerate(values) if _is_float(value)]
    if not floats:
        return flags
    if _jax():
        import jax
        import jax.numpy as jnp

        if _ALL_FINITE is None:
            _ALL_FINITE = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
        checked = _ALL_FINITE([values[i] for i in floats])
        if checked.is_fully_addressable:
            results = np.asarray(checked)
        else:
            from jax.experimental import multihost_utils

            results = multihost_utils.process_allgather(checked, tiled=True)
    else:
        results = [bool(np.all(np.isfinite(keras.ops.convert_to_numpy(values[i])))) for i in floats]
    for i, ok in zip(floats, results):
        flags[i] = bool(ok)
    return flags
