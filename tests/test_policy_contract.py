"""The policy contract π0, π0.5 and π0-FAST share, and every strategy on every model."""

import keras
import numpy as np
import pytest
from finetuning_helpers import check_optimizer_slots
from finetuning_helpers import check_two_steps
from finetuning_helpers import fit_two_steps
from finetuning_helpers import relative
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_policy
from finetuning_helpers import training_batch
from keras import ops

from keras_openpi.finetuning import STRATEGIES
from keras_openpi.finetuning import available_strategies
from keras_openpi.models import SMALL_MODELS
from keras_openpi.models import PaliGemmaPolicy
from keras_openpi.models import small_model
from keras_openpi.models.presets import DEMO_MODEL

MODELS = ("pi0", "pi05", "pi0_fast")
# What applies where: π0-FAST has no action expert (and freezing vision and VLM freezes all of it).
APPLICABLE = {
    "pi0": sorted(STRATEGIES),
    "pi05": sorted(STRATEGIES),
    "pi0_fast": ["frozen_vision", "full", "lora", "lora_vlm"],
}


@pytest.fixture(scope="module", params=MODELS)
def policy(request):
    return tiny_policy(request.param)


def test_one_contract(policy):
    assert isinstance(policy, PaliGemmaPolicy)
    batch, horizon, dim = 2, policy.action_horizon, policy.action_dim
    observation, actions = training_batch(policy, size=batch)
    obs = policy.prepare_observation(observation)
    assert len(obs["images"]) == len(policy.image_keys) and obs["tokens"].shape == (batch, policy.max_token_len)
    tokens, input_mask, ar_mask = policy.embed_prefix(obs)
    assert tokens.shape[:2] == input_mask.shape == ar_mask.shape and str(ar_mask.dtype) == "bool"
    loss = policy.unreduced_loss(observation, actions)
    assert loss.shape == ((batch, horizon) if policy.model_type != "pi0_fast" else (batch,))
    assert np.asarray(policy.compute_loss(observation, actions)).shape == ()
    assert policy.dummy_observation(batch)["tokenized_prompt"].shape == (batch, policy.max_token_len)
    if policy.model_type == "pi0_fast":
        return  # sample_actions decodes with a tokenizer: test_pi0_fast_model
    sampled = policy.sample_actions(observation, num_steps=2)
    assert ops.is_tensor(sampled) and sampled.shape == (batch, horizon, dim)
    assert str(sampled.dtype) == "float32"


def test_declarations(policy):
    groups = policy.finetuning_groups()
    expected = {
        "pi0": ["action_expert", "projections", "vision", "vlm"],
        "pi05": ["action_expert", "projections", "vision", "vlm"],
        "pi0_fast": ["vision", "vlm"],
    }[policy.model_type]
    assert sorted(groups) == expected
    assert policy.default_lora_targets() == (
        ("vlm",) if policy.model_type == "pi0_fast" else ("vlm", "action_expert")
    )
    assert groups["vlm"]["openpi_lora_rank"] == 16
    assert len(policy.remat_layers()) == policy.gemma.depth + policy.vision_encoder.depth
    assert available_strategies(policy) == APPLICABLE[policy.model_type]


# π0 with every strategy: test_finetuning_strategies.
CASES = [(m, s) for m in MODELS for s in sorted(STRATEGIES) if m != "pi0" or s == "lora"]


@pytest.mark.parametrize("model_type, strategy", CASES)
def test_every_strategy_on_every_model(model_type, strategy):
    """Applicable strategies train two steps with frozen weights bit-identical; the others say why."""
    model = like_pretrained(tiny_policy(model_type))
    if strategy not in APPLICABLE[model_type]:
        with pytest.raises(ValueError, match=f"Strategy '{strategy}' .*Pi0Fast"):
            model.apply_strategy(strategy)
        assert model.trainable_summary()["total"]["frozen"] == 0  # nothing changed
        return
    model.apply_strategy(strategy)
    targets = STRATEGIES[strategy].lora_targets
    if targets == "default":
        targets = model.default_lora_targets()
    adapted = {relative(model, v).split("/")[2] for v in model.weights if v.name == "lora_kernel_a"}
    assert adapted == set(targets)
    before = snapshot(model)
    fit_two_steps(model)
    check_two_steps(model, before)
    check_optimizer_slots(model)


@pytest.mark.parametrize("model_type", ["pi05", "pi0_fast"])
@pytest.mark.parametrize(
    "options",
    [dict(quantize="int8"), dict(frozen_dtype="bfloat16", remat=True)],
    ids=["int8", "bfloat16_remat"],
)
def test_memory_levers_on_every_model(model_type, options, tmp_path):
    """QLoRA and bfloat16 frozen weights with remat: train, save, reload identically."""
    model = like_pretrained(tiny_policy(model_type))
    model.apply_strategy("lora", rank=2, **options)
    if "quantize" in options:
        assert str(model.gemma.token_embedding.quantization_mode) == "int8"
    else:
        assert {str(v.dtype) for v in model.weights if not v.trainable} == {"bfloat16"}
    before = snapshot(model)
    fit_two_steps(model)
    check_two_steps(model, before)
    path = tmp_path / "policy.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.finetuning_state == model.finetuning_state
    observation, actions = training_batch(model, size=2, seed=5)
    np.testing.assert_array_equal(
        fixed_loss(reloaded, observation, actions), fixed_loss(model, observation, actions)
    )


def fixed_loss(model, observation, actions):
    """The loss without random draws: π0-FAST's token loss, π0's at fixed noise and time."""
    if model.model_type == "pi0_fast":
        return np.asarray(model.token_loss(observation))
    noise = np.random.default_rng(7).normal(size=actions.shape).astype("float32")
    time = np.linspace(0.2, 0.8, len(actions)).astype("float32")
    return np.asarray(model.flow_matching_loss(observation, actions, noise=noise, time=time))


def like_pretrained(model):
    """Opens π0.5's adaRMS gates, zero at initialization (as openpi's), as a trained model has them.

    With closed gates the action expert's blocks add nothing, so a strategy
    that freezes the gates (LoRA on the action expert) would train nothing
    upstream of them.
    """
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "/modulation/" in variable.path:
            variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))
    return model


def test_small_models():
    assert DEMO_MODEL["image_resolution"] == (96, 96) and SMALL_MODELS["pi0_demo"][0] == "pi0"
    for name, (model_type, _) in SMALL_MODELS.items():
        if name != "pi0_demo":
            assert small_model(name).model_type == ("pi05" if name == "pi05_tiny" else model_type)
    with pytest.raises(ValueError, match="Unknown small model 'pi0_huge'; expected one of"):
        small_model("pi0_huge")


def test_a_subclass_without_loss_or_sampler_is_told_what_to_define():
    class Half(PaliGemmaPolicy):
        pass

    model = Half.__new__(Half)  # the contract's stubs need no built layers
    with pytest.raises(NotImplementedError, match=r"Half must define unreduced_loss\(\)"):
        model.unreduced_loss({})
    with pytest.raises(NotImplementedError, match=r"Half must define sample_actions\(\)"):
        model.sample_actions({})
