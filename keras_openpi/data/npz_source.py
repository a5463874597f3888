"""A `.npz` file of arrays as a source of samples (for norm stats and small datasets)."""

import zipfile
import zlib

import numpy as np

from keras_openpi.data.finite import first_non_finite


class NpzSamples:
    """Iterates the rows of the arrays of a `.npz` file as sample dicts.

    Every selected array must have the same first axis (one entry per
    sample): e.g. `state` (N, s) and `actions` (N, H, a).

    Args:
        path: the `.npz` file.
        keys: `{sample key: array name in the file}`, or a list of names used as both.
        shuffle: iterate in a random order (seeded by `seed`).
        seed: seed of the order.

    Example:
    >>> np.savez("/tmp/demo.npz", state=np.zeros((3, 2)), action=np.ones((3, 4, 2)))
    >>> [sorted(s) for s in NpzSamples("/tmp/demo.npz", {"state": "state", "actions": "action"})][0]
    ['actions', 'state']
    """

    def __init__(self, path, keys, shuffle=False, seed=0):
        self.path = str(path)
        self.keys = dict(keys) if isinstance(keys, dict) else {k: k for k in keys}
        self.shuffle = shuffle
        self.seed = seed
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is not an .npz file (truncated, or another format).")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = [name for name in self.keys.values() if name not in data.files]
                if missing:
                    raise ValueError(
                        f"{self.path} has no array {missing[0]!r}; it has {sorted(data.files)}."
                    )
                self._arrays = {key: data[name] for key, name in self.keys.items()}
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
            raise ValueError(f"{self.path} is damaged: {error}.") from None
        for key, name in self.keys.items():
            bad = first_non_finite(self._arrays[key])
            if bad is not None:
                raise ValueError(
                    f"{self.path}: array {name!r} row {bad[0][0]} holds {bad[1]} at index "
                    f"{bad[0]}; the samples must be finite."
                )
        lengths = {
            key: array.shape[0] if array.ndim else None for key, array in self._arrays.items()
        }
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(
                f"the arrays of {self.path} must share their first axis (one row per sample), "
                f"got lengths {lengths}."
            )
        self._length = next(iter(lengths.values()))

    def __len__(self):
        return self._length

    def __iter__(self):
        order = np.arange(self._length)
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(self._length)
        for i in order:
            yield {key: array[i] for key, array in self._arrays.items()}
