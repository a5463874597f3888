"""Full-size π0 / π0.5 parameter counts against openpi's, without allocating the weights."""

import math

import pytest
from keras.src.backend.common import global_state

from keras_openpi.convert import pi0_config_from_params
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
# openpi's gemma.get_config variants.
GEMMA_2B = dict(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = dict(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)


def openpi_lora_parameters(width, depth, mlp_dim, num_heads, num_kv_heads, head_dim, rank):
    """openpi's LoRA parameter count for one Gemma, from its code's shapes.

    Base weights (gemma.py): q_einsum (N, D, H), kv_einsum (2, K, D, H),
    attn_vec_einsum (N, H, D), mlp gating_einsum (2, D, F), linear (F, D).
    `LoRAConfig.axes = (-2, -1)` (lora.py): lora_a is the base shape with
    axis -1 set to the rank, lora_b with axis -2 set to it.
    """
    shapes = [
        (num_heads, width, head_dim),
        (2, num_kv_heads, width, head_dim),
        (num_heads, head_dim, width),
        (2, width, mlp_dim),
        (mlp_dim, width),
    ]
    per_layer = sum(math.prod(s[:-1]) * rank + math.prod(s[:-2]) * rank * s[-1] for s in shapes)
    return depth * per_layer


def full_size(name, strategy, **options):
    with shapes_only():
        model = Pi0(pi05=name == "pi05")
        model.apply_strategy(strategy, **options)
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


@pytest.mark.parametrize("name", ["pi0", "pi05"])
@pytest.mark.parametrize("strategy", ["lora", "lora_vlm", "lora_action_expert"])
def test_openpi_form_adapter_counts_are_openpis(name, strategy):
    """form="openpi": openpi's trainable counts for gemma_2b_lora (16) + gemma_300m_lora (32)."""
    vlm = openpi_lora_parameters(**GEMMA_2B, rank=16)
    expert = openpi_lora_parameters(**GEMMA_300M, rank=32)
    assert (vlm, expert) == (27_869_184, 22_118_400)
    expected = {"lora": vlm + expert, "lora_vlm": vlm, "lora_action_expert": expert}[strategy]
    model = full_size(name, strategy, rank="openpi", form="openpi")
    summary = model.trainable_summary()
    assert summary["lora_adapters"]["trainable"] == expected
    if (name, strategy) in OPENPI_FROZEN:
        assert summary["total"]["frozen"] == OPENPI_FROZEN[name, strategy]
    assert model.count_params() == OPENPI_TOTAL[name] + expected
    assert model.finetuning_state.lora["action_expert" if strategy == "lora_action_expert" else "vlm"][
        "form"
    ] == "openpi"


def test_openpi_form_adapter_count_of_the_fixture_config(openpi_fixture):
    """The pi0_lora fixture (dummy Gemmas, rank 4): its lora arrays, openpi's formula, the Keras model."""
    fixture = openpi_fixture("pi0_lora")
    params = {k[len("params/") :]: v for k, v in fixture.data.items() if k.startswith("params/")}
    checkpoint = sum(v.size for k, v in params.items() if "lora" in k)
    config = pi0_config_from_params(params)
    dims = [config["paligemma_variant"], config["action_expert_variant"]]
    assert checkpoint == sum(openpi_lora_parameters(**d, rank=4) for d in dims) == 64_512
    with shapes_only():
        model = Pi0(**config, action_horizon=10, max_token_len=16)
        model.apply_strategy("lora", rank=4, form="openpi")
    assert model.trainable_summary()["lora_adapters"]["trainable"] == checkpoint
    with shapes_only():
        keras_form = Pi0(**config, action_horizon=10, max_token_len=16)
        keras_form.apply_strategy("lora", rank=4)
    # Keras' form: query and output B shared by the 8 heads (7 of 8 fewer), per block and expert.
    fewer = 2 * 4 * (7 * 4 * 16 + 7 * 4 * 64)
    assert keras_form.trainable_summary()["lora_adapters"]["trainable"] == checkpoint - fewer


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
