"""Every strategy: what it freezes, what trains, what the trainer and optimizer see."""

import re

import pytest
from finetuning_helpers import check_optimizer_slots
from finetuning_helpers import check_two_steps
from finetuning_helpers import fit_two_steps
from finetuning_helpers import relative
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_pi0

from keras_openpi.finetuning import STRATEGIES
from keras_openpi.finetuning import apply_strategy

VISION = r"vision_encoder/.*"
VLM = r"gemma/(token_embedding|decoder_block_\d+/vlm|vlm_final_norm)/.*"
EXPERT = r"gemma/(decoder_block_\d+/action_expert|action_expert_final_norm)/.*"
LINEAR = r"(attention/(query|key|value|output)|feed_forward/(gate|up|down))"

# strategy (name or config dict) -> (frozen paths, LoRA target experts), written
# from openpi's freeze filters (reference section 2.2), not from the code.
CASES = {
    "full": ("full", None, ()),
    "lora": ("lora", f"{VLM}|{EXPERT}", ("vlm", "action_expert")),
    "lora_vlm": ("lora_vlm", VLM, ("vlm",)),
    "lora_action_expert": ("lora_action_expert", EXPERT, ("action_expert",)),
    "action_expert_only": ("action_expert_only", f"{VISION}|{VLM}", ()),
    "frozen_vision": ("frozen_vision", VISION, ()),
    "regex": (
        {"name": "full", "freeze_patterns": r"gemma/decoder_block_0/.*"},
        r"gemma/decoder_block_0/.*|action_in_proj/.*",
        (),
    ),
}


def expected_trainable(model, frozen, targets):
    frozen = re.compile(frozen) if frozen else None
    adapter = re.compile(
        rf"gemma/decoder_block_\d+/({'|'.join(targets) or '-'})/{LINEAR}/lora_kernel_[ab]"
    )
    paths = {relative(model, v) for v in model.weights}
    trainable = {p for p in paths if not (frozen and frozen.fullmatch(p))}
    return trainable | {p for p in paths if adapter.fullmatch(p)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_two_fit_steps(case):
    strategy, frozen, targets = CASES[case]
    model = tiny_pi0()
    apply_strategy(model, strategy)
    if case == "regex":
        model.action_in_proj.trainable = False  # plain Keras freezing composes
    adapters = {relative(model, v) for v in model.weights if v.name.startswith("lora_kernel")}
    assert len(adapters) == 2 * 7 * 2 * len(targets)

    # The trainer differentiates with respect to exactly these.
    trainable = {relative(model, v) for v in model.trainable_variables}
    assert trainable == expected_trainable(model, frozen, targets)

    before = snapshot(model)
    fit_two_steps(model)
    check_two_steps(model, before)
    check_optimizer_slots(model)


def test_lora_counts_and_scales():
    model = tiny_pi0()
    model.enable_lora(rank={"vlm": 4, "action_expert": 2}, alpha={"vlm": 8, "action_expert": 3})
    expert = model.gemma.decoder_blocks[1].experts[1]
    query = expert.attention.query
    assert (query.lora_rank, query.lora_alpha) == (2, 3.0)
    assert tuple(query.lora_kernel_a.shape) == (2, 16, 2)  # (N, D, r)
    assert tuple(query.lora_kernel_b.shape) == (2, 8)  # (r, H): shared across heads
    down = model.gemma.decoder_blocks[0].experts[0].feed_forward.down
    assert (down.lora_rank, down.lora_alpha) == (4, 8.0)
    summary = model.trainable_summary()
    assert summary["vlm"]["trainable"] == 0 and summary["action_expert"]["trainable"] == 0
    # Per block and expert: q A+B, k, v, output, gate, up, down (see docs/fine_tuning.md).
    vlm = 2 * 32 * 4 + 4 * 8 + 2 * (32 * 4 + 4 * 8) + 2 * 8 * 4 + 4 * 32 + 2 * (32 * 4 + 4 * 64) + 64 * 4 + 4 * 32
    expert_count = 2 * 16 * 2 + 2 * 8 + 2 * (16 * 2 + 2 * 8) + 2 * 8 * 2 + 2 * 16 + 2 * (16 * 2 + 2 * 32) + 32 * 2 + 2 * 16
    assert summary["lora_adapters"]["trainable"] == 2 * (vlm + expert_count)
    assert summary["lora_adapters"]["optimizer_bytes"] == 2 * 4 * 2 * (vlm + expert_count)
    assert "lora_adapters" in str(summary) and "vlm r=4 alpha=8" in str(summary)
    assert model.trainable_summary(optimizer_slots=1)["total"]["optimizer_bytes"] == (
        summary["total"]["trainable_bytes"]
    )


def test_openpi_rank_and_freeze_vision():
    model = tiny_pi0()
    model.enable_lora(rank="openpi", freeze_vision=True)
    layers = model.gemma.decoder_blocks[0].experts
    assert layers[0].attention.key.lora_rank == 16 and layers[0].attention.key.lora_alpha == 16
    assert layers[1].feed_forward.up.lora_rank == 32 and layers[1].feed_forward.up.lora_alpha == 32
    summary = model.trainable_summary()
    assert summary["vision"]["trainable"] == 0 and summary["vision"]["frozen"] > 0
    assert summary["projections"]["frozen"] == 0


def test_pi05_lora_freezes_adaptive_norms():
    model = tiny_pi0(pi05=True)
    model.apply_strategy("lora_action_expert")
    frozen = {relative(model, v) for v in model.weights if not v.trainable}
    modulation = {p for p in frozen if "/modulation/" in p}
    # pre-attention and pre-feed-forward norms of each block, plus the final norm; kernel and bias.
    assert len(modulation) == 2 * (2 * 2 + 1)
    assert all(re.fullmatch(EXPERT, p) for p in frozen)


def test_strategy_errors():
    model = tiny_pi0()
    with pytest.raises(ValueError, match="Unknown fine-tuning strategy 'lora_all'; expected one of"):
        apply_strategy(model, "lora_all")
    with pytest.raises(ValueError, match="needs a 'name'"):
        apply_strategy(model, {"rank": 4})
    with pytest.raises(ValueError, match="Bad strategy options"):
        apply_strategy(model, {"name": "lora", "ranks": 4})
    with pytest.raises(ValueError, match="matches no weight of 'pi0'"):
        model.freeze(r"gemma/block_0/.*")
    with pytest.raises(ValueError, match="Unknown LoRA target 'vision'"):
        model.enable_lora(targets=("vision",))
    with pytest.raises(ValueError, match="LoRA rank for 'vlm' must be a positive int"):
        model.enable_lora(rank=0)
    with pytest.raises(ValueError, match="given per target \\['vlm'\\] but not for 'action_expert'"):
        model.enable_lora(rank={"vlm": 4})
    with pytest.raises(ValueError, match="strategy 'full' freezes none"):
        apply_strategy(model, "full", quantize="int8")
    with pytest.raises(ValueError, match="quantize must be 'int8', 'int8_weight_only' or a"):
        apply_strategy(model, "lora", quantize="int4")
    assert model.trainable_summary()["total"]["frozen"] == 0  # nothing changed
    model.enable_lora(rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_strategy(model, "lora")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        model.enable_lora(rank=2)


def test_strategies_table_is_complete():
    assert sorted(STRATEGIES) == sorted(
        ["full", "lora", "lora_vlm", "lora_action_expert", "action_expert_only", "frozen_vision"]
    )


def test_unfreeze_keeps_lora_base_kernels_frozen():
    model = tiny_pi0()
    model.apply_strategy("lora_vlm", freeze_vision=True)
    model.unfreeze(groups=["vision", "vlm"])
    frozen = {relative(model, v) for v in model.weights if not v.trainable}
    assert frozen == {
        p for p in (relative(model, v) for v in model.weights)
        if re.fullmatch(rf"gemma/decoder_block_\d+/vlm/{LINEAR}/kernel", p)
    }


def test_keras_freezing_survives_config_round_trip():
    model = tiny_pi0()
    model.enable_lora(rank=2, targets=("action_expert",))
    model.vision_encoder.trainable = False  # plain Keras, outside any strategy
    model.gemma.token_embedding.embeddings.trainable = False
    rebuilt = type(model).from_config(model.get_config())
    assert not rebuilt.vision_encoder.trainable
    assert {relative(rebuilt, v) for v in rebuilt.trainable_weights} == {
        relative(model, v) for v in model.trainable_weights
    }
    assert rebuilt.finetuning_state.lora == {"action_expert": {"rank": 2, "alpha": 2.0}}
