"""π0-FAST served as π0 is: `Policy` through the model contract, openpi's own client, no made-up actions.

A tiny π0-FAST is taught one action chunk after four prompts, through the
serving chain of the raw robot with quantile norm stats (the prompts differ in
length, so that it cannot rely on absolute positions: openpi decodes one
position further than it trains). Served from a `.keras` file or a training
checkpoint it must answer that chunk, decoded by the FAST tokenizer it
carries and unnormalized. An untrained one emits tokens that hold no chunk:
the policy raises and the server sends an error frame naming the cause,
never zeros (which openpi sends and a robot would execute).
"""

import types

import keras
import numpy as np
import pytest
from fast_support import VOCABULARY_SIZE
from fast_support import prompt_tokenizer
from serving_support import CAMERAS
from serving_support import ServerProcess
from serving_support import make_request
from serving_support import run_client
from serving_support import tiny_pi0
from serving_support import write_norm_stats
from test_serving_attacks import HOSTILE

from keras_openpi import Policy
from keras_openpi.data import pipeline
from keras_openpi.data.loader import collate
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.normalize import normalize
from keras_openpi.data.normalize import unnormalize
from keras_openpi.data.robots import get_robot
from keras_openpi.data.transforms import compose
from keras_openpi.models import Pi0Fast
from keras_openpi.serving.model_inputs import ModelInputs
from keras_openpi.serving.policy import UndecodableActions
from keras_openpi.serving.policy import sampler_options
from keras_openpi.serving.robots import robot_transforms
from keras_openpi.tokenizers.fast import FASTDecodeError
from keras_openpi.training.checkpoints import CheckpointManager

HORIZON, DIM, LENGTH, STEPS = 4, 5, 64, 32
PROMPTS = ["pick up the cup", "put the towel in the basket", "open the drawer", "close it"]
# The taught chunk, in the robot's units (the norm stats' quantiles are ±(1 + dim)).
CHUNK = np.linspace(-0.5, 0.5, HORIZON)[:, None] * np.linspace(-1.0, 1.0, DIM) * (1 + np.arange(DIM))
GEMMA = dict(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
VISION = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16)
UNDECODABLE = r"^π0-FAST generated no valid action chunk for example 0 of 1: .+ No actions were sent\.$"


def tiny_fast(tokenizer=None):
    return Pi0Fast(
        GEMMA,
        VISION,
        vocabulary_size=VOCABULARY_SIZE,
        action_dim=DIM,
        action_horizon=HORIZON,
        max_token_len=LENGTH,
        image_keys=CAMERAS,
        image_resolution=(32, 32),
        seed=0,
        tokenizer=tokenizer,
    )


def request(index):
    return make_request(0, prompt=PROMPTS[index])


def decoding_layout(sample):
    """A training sample laid out as `generate` reads it: one position further for the actions.

    openpi decodes the action token s at position `prefill_len + s + 1`, one further
    than training puts it (`Pi0Fast.generate`). A big model does not mind; a tiny one
    taught in the training layout decodes its chunk only for some prompts. Here the first
    action token is repeated: its first copy is the last prefix token's target, hidden
    from the tokens after it; the second copy is read at the position `generate` reads it.
    """
    first = int(np.argmax(sample["token_ar_mask"]))

    def shifted(key, first_values):
        value = sample[key]
        return np.concatenate([value[:first], first_values, value[first:]])[: len(value)]

    out = dict(sample)
    out["tokenized_prompt"] = shifted("tokenized_prompt", sample["tokenized_prompt"][first:][:1])
    out["tokenized_prompt_mask"] = shifted("tokenized_prompt_mask", [False])
    out["token_ar_mask"] = shifted("token_ar_mask", [1])
    loss = shifted("token_loss_mask", [True])
    loss[first + 1] = False  # the hidden copy predicts nothing
    out["token_loss_mask"] = loss
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fast")
    tokenizer = prompt_tokenizer(directory / "tokenizer", HORIZON, DIM, LENGTH)
    write_norm_stats(directory)
    stats = load_norm_stats(directory)
    chain = pipeline.build_transforms(
        robot=get_robot("raw", model_type="pi0_fast"),
        model=pipeline.model_transforms(
            "pi0_fast",
            tokenizer=tokenizer,
            action_dim=DIM,
            image_size=(32, 32),
            action_horizon=HORIZON,
        ),
        norm_stats=stats,
        use_quantiles=True,
    )
    samples = [compose(chain.inputs)({**request(i), "actions": CHUNK}) for i in range(4)]
    observation, actions = collate([decoding_layout(sample) for sample in samples])
    keras.utils.set_random_seed(0)
    model = tiny_fast(tokenizer)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(
        observation, actions, epochs=150, batch_size=4, shuffle=False, verbose=0
    ).history
    assert history["loss"][-1] < 0.1
    model.save(directory / "taught.keras")
    CheckpointManager(directory / "taught_run").save(1, model, norm_stats=stats, asset_id="tiny")
    CheckpointManager(directory / "untrained_run").save(
        1, tiny_fast(tokenizer), norm_stats=stats, asset_id="tiny"
    )
    fast = tokenizer.fast_tokenizer
    normalized = normalize(CHUNK, stats["actions"], use_quantiles=True)
    decoded = fast.decode(fast.encode(normalized), HORIZON, DIM)
    return types.SimpleNamespace(
        directory=directory,
        tokenizer=tokenizer,
        expected=unnormalize(decoded, stats["actions"], use_quantiles=True),
    )


@pytest.fixture(scope="module")
def policy(files):
    return Policy.from_checkpoint(files.directory / "taught.keras", max_decoding_steps=STEPS)


@pytest.mark.parametrize("source", ["taught.keras", "taught_run", "taught_run/1"])
def test_the_taught_chunk_is_served_decoded_and_unnormalized(files, source):
    policy = Policy.from_checkpoint(files.directory / source, max_decoding_steps=STEPS)
    assert policy.metadata == {"robot": "raw", "model_type": "pi0_fast", "action_horizon": HORIZON}
    assert policy.sample_options == {"max_decoding_steps": STEPS, "temperature": 0.0}
    assert policy.num_steps is None and policy.warmup_seconds > 0.0
    for index in range(len(PROMPTS)):
        result = policy.infer(request(index))
        assert result["actions"].shape == (HORIZON, DIM)
        np.testing.assert_allclose(result["actions"], files.expected, rtol=1e-5, atol=1e-5)
    # One batch of prefixes of different lengths (right-aligned for decoding).
    batch = policy.infer_batch([request(i) for i in range(len(PROMPTS))])
    assert batch["policy_timing"]["batch_size"] == 4
    np.testing.assert_allclose(
        batch["actions"], np.broadcast_to(files.expected, (4, HORIZON, DIM)), rtol=1e-5, atol=1e-5
    )


def test_tokens_that_hold_no_chunk_are_an_error_never_zeros(files):
    policy = Policy.from_checkpoint(files.directory / "untrained_run", max_decoding_steps=STEPS)
    for _ in range(2):  # the policy goes on answering (with the same reason)
        with pytest.raises(UndecodableActions, match=UNDECODABLE):
            policy.infer(request(0))
    with pytest.raises(UndecodableActions, match="example 0 of 2"):
        policy.infer_batch([request(0), request(1)])
    # The model itself keeps openpi's behavior (zeros) unless asked to be strict.
    inputs, _ = robot_transforms(
        "raw", policy.model, norm_stats=load_norm_stats(files.directory), tokenizer=files.tokenizer
    )
    sample = compose([*inputs, ModelInputs.for_model(policy.model)])(request(0))
    batch = keras.tree.map_structure(lambda x: np.asarray(x)[None], sample)
    zeros = policy.model.sample_actions(batch, max_decoding_steps=STEPS)
    np.testing.assert_array_equal(np.asarray(zeros), np.zeros((1, HORIZON, DIM)))
    with pytest.raises(FASTDecodeError):
        policy.model.sample_actions(batch, max_decoding_steps=STEPS, strict=True)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request_is_refused_naming_the_key(policy, files, case):
    """test_serving_attacks' requests, against π0-FAST: the same reasons, for its vocabulary (the
    tokenizer's 768 ids) and its quantile normalization ((1e300 + 1) / 2 * 2 - 1)."""
    bad, message = HOSTILE[case]
    message = message.replace("259", str(VOCABULARY_SIZE)).replace("9.99999e\\+299", "1e\\+300")
    with pytest.raises(ValueError, match=message):
        policy.infer(bad)
    np.testing.assert_allclose(policy.infer(request(1))["actions"], files.expected, atol=1e-5)


def test_options_of_the_other_models_are_refused(policy, files):
    fast = policy.model
    with pytest.raises(
        ValueError,
        match=r"^'num_steps' is an option of pi0 and pi05; this is a pi0_fast model, whose sampler "
        r"takes \['max_decoding_steps', 'temperature'\]\.$",
    ):
        Policy(fast, num_steps=10, warmup=False)
    with pytest.raises(ValueError, match="'fixed_noise' is for π0 / π0.5"):
        Policy(fast, fixed_noise=True, warmup=False)
    with pytest.raises(ValueError, match="'noise' is for π0 / π0.5"):
        policy.infer(request(0), noise=np.zeros((HORIZON, DIM), np.float32))
    with pytest.raises(ValueError, match="'max_decoding_steps' is an option of pi0_fast; this is"):
        Policy(tiny_pi0(), max_decoding_steps=8, warmup=False)
    with pytest.raises(ValueError, match=r"'temperature' must be a finite number >= 0, got -1"):
        sampler_options("pi0_fast", temperature=-1)
    with pytest.raises(ValueError, match=r"'max_decoding_steps' must be an integer >= 1, got 0"):
        sampler_options("pi0_fast", max_decoding_steps=0)
    assert sampler_options("pi05", num_steps=None) == {"num_steps": 10}


def test_sampling_is_seeded_by_the_policy(files):
    """With temperature > 0 the tokens are drawn from the model's generator, seeded by `seed`."""
    path = files.directory / "untrained_run"

    def outcome(seed):
        policy = Policy.from_checkpoint(path, max_decoding_steps=8, temperature=1.0, seed=seed)
        with pytest.raises(UndecodableActions) as error:
            policy.infer(request(0))
        return str(error.value)

    assert outcome(1) == outcome(1) != outcome(2)


def test_the_tokenizer_comes_with_the_model(files, tmp_path):
    bare = tiny_fast()
    bare.save(tmp_path / "bare.keras")
    with pytest.raises(ValueError, match="this π0-FAST model carries no tokenizer: give one with"):
        Policy.from_checkpoint(tmp_path / "bare.keras", warmup=False)
    files.tokenizer.save(tmp_path / "tokenizer")
    policy = Policy.from_checkpoint(
        tmp_path / "bare.keras", tokenizer=tmp_path / "tokenizer", warmup=False
    )
    assert policy.model.tokenizer.tokenizer is not None
    with pytest.raises(ValueError, match="carries its own tokenizer .* drop --tokenizer"):
        Policy.from_checkpoint(files.directory / "taught.keras", tokenizer=tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="must be a directory with paligemma_tokenizer.model"):
        Policy.from_checkpoint(tmp_path / "bare.keras", tokenizer="byte", warmup=False)


# === `keras-openpi serve` and openpi's client ===

CLIENT = """
from openpi_client.websocket_client_policy import WebsocketClientPolicy

policy = WebsocketClientPolicy("127.0.0.1", ARGS["port"])
PROMPTS = ARGS["prompts"]
replies = [policy.infer(make_request(0, prompt=p))["actions"].tolist() for p in PROMPTS]
try:
    policy.infer({**make_request(0, prompt=PROMPTS[0]), "state": "0.1 0.2"})
    error = None
except Exception as raised:
    error = str(raised)
print(json.dumps({"metadata": policy.get_server_metadata(), "replies": replies, "error": error}))
"""
FAILING_CLIENT = """
from openpi_client.websocket_client_policy import WebsocketClientPolicy

try:
    WebsocketClientPolicy("127.0.0.1", ARGS["port"]).infer(make_request(0, prompt="close it"))
    error = None
except Exception as raised:
    error = str(raised)
print(json.dumps({"error": error}))
"""


def serve(args):
    return ServerProcess([*map(str, args), "--max-decoding-steps", str(STEPS)]).start()


def test_keras_openpi_serve_answers_openpis_client(files):
    taught = serve([files.directory / "taught.keras"])
    untrained = serve([files.directory / "untrained_run"])
    try:
        result = run_client(CLIENT, {"port": taught.wait_ready().port, "prompts": PROMPTS})
        failed = run_client(FAILING_CLIENT, {"port": untrained.wait_ready().port})
    finally:
        codes = taught.stop(), untrained.stop()
    assert codes == (0, 0), taught.log()[-3000:] + untrained.log()[-3000:]
    assert result["metadata"]["model_type"] == "pi0_fast"
    np.testing.assert_allclose(
        result["replies"], np.broadcast_to(files.expected, (4, HORIZON, DIM)), atol=1e-5
    )
    assert "bad request: 'state' must be a numeric array of rank 1, got str" in result["error"]
    assert failed["error"].startswith(
        "Error in inference server:\ninternal error: π0-FAST generated no valid action chunk "
        "for example 0 of 1: "
    ) and failed["error"].endswith("No actions were sent.")
    assert "max_decoding_steps 32, temperature 0.0" in taught.log()
