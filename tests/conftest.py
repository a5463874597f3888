import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(
    os.environ.get("KERAS_OPENPI_FIXTURES", REPO.parent / "shared" / "fixtures" / "openpi")
)


def fixture_path(name):
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(
            f"openpi fixture {path} not found: the parity tests need ../shared/fixtures/openpi "
            "next to the repository (or KERAS_OPENPI_FIXTURES)."
        )
    return path


class Fixture:
    """One openpi reference file: its inputs as an observation, outputs, meta."""

    def __init__(self, name):
        self.path = fixture_path(f"{name}.npz")
        with np.load(self.path) as data:
            self.data = {k: data[k] for k in data.files}
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
