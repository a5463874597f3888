"""`PolicyRecorder`: saves every request and its reply, as openpi's recorder does."""

import contextlib
import logging
import os
import pathlib
import re

import numpy as np

from keras_openpi.data.transforms import flatten_dict

logger = logging.getLogger("keras_openpi.serving")

_STEP_FILE = re.compile(r"step_(\d+)\.npy")


class PolicyRecorder:
    """Wraps a policy and writes `record_dir/step_<i>.npy` for each call.

    Each file is openpi's record: `np.save` of the dict
    `{"inputs/<path>": ..., "outputs/<path>": ...}` (the observation and the
    policy's reply, "/"-flattened) as a 0-d object array; read one back with
    `np.load(path, allow_pickle=True).item()`. Numbering continues after the
    steps already in the directory, so a restarted server keeps old records.
    A record is written whole or not at all (to a temporary file, then
    renamed); when it cannot be written (a full disk) the error is logged
    naming the file, and the reply still goes to the robot.

    Args:
        policy: has `infer(obs, noise=None)`, `infer_batch` and `metadata`.
        record_dir: the directory to write to (created if missing).

    Example:
    >>> recorder = PolicyRecorder(policy, "policy_records")  # doctest: +SKIP
    >>> recorder.infer(observation)["actions"].shape  # doctest: +SKIP
    (50, 14)
    """

    def __init__(self, policy, record_dir):
        self._policy = policy
        self.record_dir = pathlib.Path(record_dir)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        steps = [
            int(match.group(1))
            for match in map(_STEP_FILE.fullmatch, (p.name for p in self.record_dir.iterdir()))
            if match
        ]
        self._next_step = max(steps, default=-1) + 1
        logger.info("recording requests and replies to %s", self.record_dir)

    @property
    def metadata(self):
        return self._policy.metadata

    def infer(self, obs, noise=None):
        result = self._policy.infer(obs, noise=noise)
        self._record({"inputs": obs, "outputs": result})
        return result

    def infer_batch(self, observations, noise=None):
        result = self._policy.infer_batch(observations, noise=noise)
        inputs = {str(i): obs for i, obs in enumerate(observations)}
        self._record({"inputs": inputs, "outputs": result})
        return result

    def _record(self, data):
        path = self.record_dir / f"step_{self._next_step}.npy"
        self._next_step += 1
        record = np.empty((), dtype=object)
        record[()] = flatten_dict(data)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as file:
                np.save(file, record)
            os.replace(partial, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            logger.error("could not record %s (the reply was sent): %s", path, error)
