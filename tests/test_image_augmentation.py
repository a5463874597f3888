"""`ImageAugmentation`: openpi's augmentation (tests in test_transforms) as a layer with its own seed."""

import keras
import numpy as np

from keras_openpi.layers import ImageAugmentation
from keras_openpi.layers import augment_images
from keras_openpi.models import small_model


def _images(seed, batch=2, size=16):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)
    return {"base_0_rgb": image, "left_wrist_0_rgb": image[::-1].copy()}


def test_layer_applies_augment_images_with_its_own_generator():
    images = _images(0)
    layer = ImageAugmentation(seed=7, hue=0.2)
    untouched = layer(images, training=False)
    for key in images:
        np.testing.assert_array_equal(np.asarray(untouched[key]), images[key])
    state = keras.ops.convert_to_numpy(layer.seed_generator.state).copy()
    first = layer(images, training=True)
    expected = augment_images(images, keras.random.SeedGenerator(7), hue=0.2)
    for key in images:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(first[key]), np.asarray(expected[key]))
    assert not np.array_equal(keras.ops.convert_to_numpy(layer.seed_generator.state), state)
    second = layer(images, training=True)
    assert not np.allclose(np.asarray(second["base_0_rgb"]), np.asarray(first["base_0_rgb"]))


def test_layer_config_round_trip():
    layer = ImageAugmentation(seed=3, crop_scale=0.9, saturation=0.5, name="augmentation")
    clone = ImageAugmentation.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    images = _images(1)
    np.testing.assert_array_equal(
        np.asarray(clone(images, training=True)["base_0_rgb"]),
        np.asarray(layer(images, training=True)["base_0_rgb"]),
    )


def test_policies_hold_the_augmentation_apart_from_their_noise_generator():
    model = small_model("pi0_tiny", seed=4, augment=True)
    assert model.image_augmentation.seed == 5 and model.seed_generator.get_config()["seed"] == 4
    paths = [v.path for v in model.variables]
    assert len(set(paths)) == len(paths)  # checkpoints key variables by path
    assert {p for p in paths if "seed_generator" in p} == {
        "seed_generator/seed_generator_state",
        "image_augmentation_seed_generator/seed_generator_state",
    }
