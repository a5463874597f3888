"""DataLoader: batches in the model's format, seeded epochs, sharding and exact resume."""

import keras
import numpy as np
import pytest

from keras_openpi.models.presets import DEMO_MODEL
from keras_openpi.data.loader import DataLoader
from keras_openpi.data.loader import collate
from keras_openpi.data.pipeline import build_transforms
from keras_openpi.data.pipeline import model_transforms
from keras_openpi.data.procedural_source import ProceduralDataset
from keras_openpi.data.robots import get_robot
from keras_openpi.data.sources import make_source
from keras_openpi.models.pi0 import Pi0
from keras_openpi.tokenizers import ByteTokenizer

TOKENS = 32


@pytest.fixture(scope="module")
def source():
    return ProceduralDataset(4, image_size=32, action_horizon=10)


def _pi0_inputs(image_size=32):
    model = model_transforms(
        "pi0", tokenizer=ByteTokenizer(TOKENS), action_dim=8, image_size=(image_size, image_size)
    )
    return build_transforms(robot=get_robot("raw"), model=model).inputs


class Numbers:
    """Sample i is {"x": i}: batches show which samples they hold."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"x": np.int64(index)}


class NumberStream:
    """A streaming source (no random access) with a seeded order."""

    def __init__(self, size):
        self.size = size

    def iterate(self, shuffle=False, seed=0, buffer_size=0):
        order = np.random.default_rng(seed).permutation(self.size) if shuffle else range(self.size)
        return ({"x": np.int64(i)} for i in order)


def _x(loader, index):
    return loader[index]["x"].tolist()


def test_batches_have_the_model_format(source):
    loader = DataLoader(source, 6, transform=_pi0_inputs(), seed=1, workers=2)
    observation, actions = loader[0]
    assert sorted(observation) == [
        "image",
        "image_mask",
        "state",
        "tokenized_prompt",
        "tokenized_prompt_mask",
    ]
    assert observation["image"]["base_0_rgb"].shape == (6, 32, 32, 3)
    assert observation["image"]["base_0_rgb"].dtype == np.uint8
    assert observation["image_mask"]["right_wrist_0_rgb"].tolist() == [True] * 6
    assert observation["state"].shape == (6, 8) and observation["state"].dtype == np.float32
    assert observation["tokenized_prompt"].shape == (6, TOKENS)
    assert observation["tokenized_prompt"].dtype == np.int32
    assert actions.shape == (6, 10, 8) and actions.dtype == np.float32
    expected = [source[int(i)]["actions"] for i in loader.sample_indices(0)]
    np.testing.assert_array_equal(actions[:, :, :3], np.stack(expected))
    np.testing.assert_array_equal(actions[:, :, 3:], 0.0)


def test_epochs_are_seeded_permutations_without_the_last_partial_batch():
    loader = DataLoader(Numbers(10), 3, seed=7, model_inputs=False)
    assert loader.batches_per_epoch == 3 and loader.num_batches is None
    epoch0 = [x for b in range(3) for x in _x(loader, b)]
    epoch1 = [x for b in range(3, 6) for x in _x(loader, b)]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and epoch0 != epoch1
    again = DataLoader(Numbers(10), 3, seed=7, model_inputs=False)
    assert [_x(again, b) for b in range(6)] == [_x(loader, b) for b in range(6)]
    assert _x(DataLoader(Numbers(10), 3, seed=8, model_inputs=False), 0) != _x(loader, 0)
    ordered = DataLoader(Numbers(10), 3, shuffle=False, model_inputs=False)
    assert [_x(ordered, b) for b in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_epoch_mode_ends(source):
    loader = DataLoader(Numbers(10), 4, num_epochs=2, shuffle=False, model_inputs=False)
    assert loader.num_batches == 4
    assert [b["x"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    with pytest.raises(IndexError, match="out of range for 4 batches"):
        loader[4]


def test_restored_loader_yields_the_same_next_batches(source):
    transform = _pi0_inputs()
    interrupted = DataLoader(source, 8, transform=transform, seed=3, workers=2)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.state()
    assert state["next_batch"] == 5
    continued = [next(iterator) for _ in range(3)]
    resumed = DataLoader(source, 8, transform=transform, seed=3, workers=2).restore(state)
    assert resumed.start == 5
    for (obs, actions), (obs_again, actions_again) in zip(continued, resumed):
        np.testing.assert_array_equal(actions, actions_again)
        np.testing.assert_array_equal(
            obs["image"]["left_wrist_0_rgb"], obs_again["image"]["left_wrist_0_rgb"]
        )
        np.testing.assert_array_equal(obs["tokenized_prompt"], obs_again["tokenized_prompt"])
    # What fit sees: loader[i] is global batch start + i.
    np.testing.assert_array_equal(resumed[2][1], continued[2][1])
    with pytest.raises(ValueError, match="made with batch_size=8 but this loader has batch_size=4"):
        DataLoader(source, 4, transform=transform, seed=3).restore(state)


def test_streaming_sources_resume_by_replaying():
    stream = DataLoader(NumberStream(11), 2, seed=5, model_inputs=False, workers=3)
    assert stream.num_batches is None and not stream.random_access
    batches = [b["x"].tolist() for _, b in zip(range(12), stream)]
    assert sorted(x for b in batches[:5] for x in b) == sorted(
        np.random.default_rng([5, 0]).permutation(11)[:10].tolist()
    )
    resumed = DataLoader(NumberStream(11), 2, seed=5, model_inputs=False).restore({"next_batch": 7})
    assert [b["x"].tolist() for _, b in zip(range(5), resumed)] == batches[7:12]
    once = DataLoader(NumberStream(5), 2, shuffle=False, num_epochs=1, model_inputs=False)
    assert [b["x"].tolist() for b in once] == [[0, 1], [2, 3]]


def test_shards_split_each_global_batch():
    whole = DataLoader(Numbers(12), 4, seed=2, model_inputs=False)
    parts = [DataLoader(Numbers(12), 4, seed=2, shard=(p, 2), model_inputs=False) for p in range(2)]
    for batch in range(4):
        assert _x(parts[0], batch) + _x(parts[1], batch) == _x(whole, batch)
    with pytest.raises(ValueError, match="must divide evenly over 3 processes"):
        DataLoader(Numbers(12), 4, shard=(0, 3))


def test_collate_errors():
    with pytest.raises(ValueError, match="needs 'actions' after the transforms"):
        collate([{"state": np.zeros(2)}])
    with pytest.raises(ValueError, match=r"disagree on the shape of 'state': \[\(2,\), \(3,\)\]"):
        collate([{"state": np.zeros(2)}, {"state": np.zeros(3)}], model_inputs=False)
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        DataLoader(Numbers(10), 16)
    with pytest.raises(ValueError, match="unknown data source 'lerobott'.*Did you mean 'lerobot'"):
        make_source("lerobott", path="x")


def test_model_fit_trains_on_the_loader():
    config = dict(DEMO_MODEL, image_resolution=(32, 32), max_token_len=TOKENS)
    model = Pi0(**config, vocabulary_size=ByteTokenizer.vocabulary_size, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    data = ProceduralDataset(2, image_size=32, action_horizon=config["action_horizon"])
    loader = DataLoader(data, 4, transform=_pi0_inputs(), workers=2)
    history = model.fit(loader, steps_per_epoch=2, epochs=1, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    assert int(model.optimizer.iterations.numpy()) == 2
