"""Full-size π0 / π0.5 parameter counts against openpi's, without allocating the weights."""

import pytest
from keras.src.backend.common import global_state

from keras_openpi.finetuning import shapes_only
from keras_openpi.models import Pi0

# openpi's own numbers (reference section 2.2), from its freeze filters.
OPENPI_FROZEN = {
    ("pi0", "lora"): 2_819_996_672,
    ("pi0", "lora_vlm"): 2_508_531_712,
    ("pi0", "lora_action_expert"): 311_464_960,
    ("pi05", "lora"): 2_936_464_384,
}
OPENPI_TOTAL = {"pi0": 3_238_048_528, "pi05": 3_353_433_872}
SIGLIP_SO400M = 414_803_696  # openpi's PaliGemma/img, head projection included


def full_size(name, strategy):
    with shapes_only():
        model = Pi0(pi05=name == "pi05")
        model.apply_strategy(strategy)
    return model


@pytest.mark.parametrize("name, strategy", sorted(OPENPI_FROZEN))
def test_openpi_frozen_counts(name, strategy):
    model = full_size(name, strategy)
    summary = model.trainable_summary()
    assert summary["total"]["frozen"] == OPENPI_FROZEN[name, strategy]
    assert model.count_params() == OPENPI_TOTAL[name] + summary["lora_adapters"]["trainable"]
    assert summary["vision"] == {
        "trainable": SIGLIP_SO400M,
        "frozen": 0,
        "trainable_bytes": 4 * SIGLIP_SO400M,
        "frozen_bytes": 0,
        "optimizer_bytes": 8 * SIGLIP_SO400M,
    }
    assert "other" not in summary
    # Nothing was allocated: every weight is still a deferred (shape-only) variable.
    assert all(v._value is None for v in model.weights)
    assert global_state.get_global_attribute("uninitialized_variables") == []


def test_keras_lora_adapter_counts():
    """Keras' factorization (B shared across heads) against openpi's per-head one.

    openpi, gemma_2b rank 16: 27,869,184; gemma_300m rank 32: 22,118,400. Keras'
    query B is (r, H) instead of (N, r, H) and its output B (r, D) instead of
    (N, r, D): per block 8*16*256 - 16*256 + 8*16*2048 - 16*2048 fewer for the VLM.
    """
    counts = {}
    for strategy in ("lora_vlm", "lora_action_expert"):
        counts[strategy] = full_size("pi0", strategy).trainable_summary()["lora_adapters"]["trainable"]
    per_block_vlm = 7 * 16 * 256 + 7 * 16 * 2048
    per_block_expert = 7 * 32 * 256 + 7 * 32 * 1024
    assert counts["lora_vlm"] == 27_869_184 - 18 * per_block_vlm == 23_224_320
    assert counts["lora_action_expert"] == 22_118_400 - 18 * per_block_expert == 16_957_440


def test_full_size_memory_levers():
    with shapes_only():
        model = Pi0()
        model.apply_strategy("lora", frozen_dtype="bfloat16")
    summary = model.trainable_summary()
    assert summary["total"]["frozen_bytes"] == 2 * OPENPI_FROZEN["pi0", "lora"]
    assert summary["total"]["trainable_bytes"] == 4 * summary["total"]["trainable"]
    assert summary["total"]["optimizer_bytes"] == 8 * summary["total"]["trainable"]
    assert summary["total"]["training_bytes"] == (
        2 * OPENPI_FROZEN["pi0", "lora"] + 16 * summary["total"]["trainable"]
    )
