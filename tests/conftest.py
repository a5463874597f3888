import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "openpi"
# Each fixture's inputs live in a file of their own (every file under 5 MB);
# π0, π0.5 and π0 LoRA share theirs (see tests/fixtures/openpi/README.md).
INPUTS = {"pi0": "pi0_inputs", "pi05": "pi0_inputs", "pi0_lora": "pi0_inputs",
          "pi0_fast": "pi0_fast_inputs"}


def fixture_path(name):
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(
            f"openpi fixture {path} not found: tests/fixtures/openpi/generate.py regenerates it."
        )
    return path


class Fixture:
    """One openpi reference: its inputs as an observation, outputs, meta.

    `path` is its `<name>.npz` (parameters, outputs, meta), the file the
    importers read; the inputs are merged in from their own file.
    """

    def __init__(self, name):
        self.path = fixture_path(f"{name}.npz")
        self.data = {}
        for path in (self.path, fixture_path(f"{INPUTS[name]}.npz")):
            with np.load(path) as data:
                self.data.update({k: data[k] for k in data.files})
        self.meta = eval(str(self.data["meta"]))  # a repr'd dict of plain values
        self.image_keys = sorted(
            k[len("input/images/") :] for k in self.data if k.startswith("input/images/")
        )

    def __getitem__(self, key):
        return self.data[key]

    def observation(self, image_keys):
        d = self.data
        return {
            "image": {k: d[f"input/images/{k}"] for k in image_keys},
            "image_mask": {k: d[f"input/masks/{k}"] for k in image_keys},
            "state": d["input/state"],
            "tokenized_prompt": d["input/toks"],
            "tokenized_prompt_mask": d["input/tmask"],
        }


@pytest.fixture(scope="session")
def openpi_fixture():
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = Fixture(name)
        return cache[name]

    return load
