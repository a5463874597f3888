"""π0.5 and π0-FAST through `keras-openpi train` as π0 goes: a few steps, exact resume, export, serve.

Each model trains its small config on the generated reach task, tiny: a run
of 4 steps, and a run interrupted at step 2 then resumed, which must log the
same metrics and end with the same weights. The export and the checkpoints
serve alike; π0-FAST's carry its tokenizer (the export through openpi's client).
"""

import contextlib
import io
import json

import numpy as np
import pytest
from fast_support import VOCABULARY_SIZE
from fast_support import write_tokenizer_files
from serving_support import ServerProcess
from serving_support import run_client

from keras_openpi.cli import main
from keras_openpi.convert.keras_file import load_keras_policy
from keras_openpi.data.procedural_source import ProceduralDataset
from keras_openpi.serving import Policy
from keras_openpi.serving.policy import UndecodableActions
from keras_openpi.training import read_metrics

GEMMA = dict(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
VISION = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16)
COMMON = [
    f"model.paligemma_variant={json.dumps(GEMMA)}",
    f"model.vision_variant={json.dumps(VISION)}",
    "model.image_resolution=[32, 32]",
    'data.source_options={"num_episodes": 3, "image_size": 32}',
    "batch_size=2",
]
HORIZON = 10  # the demo's; the reach task's actions have 3 dims
SETS = {
    "pi05_demo": [*COMMON, f"model.action_expert_variant={json.dumps(GEMMA)}"],
    "pi0_fast_demo": [*COMMON, f"model.vocabulary_size={VOCABULARY_SIZE}", "model.max_token_len=80"],
}


def train(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *args])
    assert code == 0, err.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module", params=sorted(SETS))
def runs(request, tmp_path_factory):
    """`full`: 4 steps; `resumed`: 2 steps, then resumed to 4."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    sets = [*SETS[name], f"assets_dir={root / 'assets'}"]
    if name == "pi0_fast_demo":
        model_path, fast_dir = write_tokenizer_files(root / "tokenizer", HORIZON, 3)
        sets += [f"tokenizer={model_path}", f"fast_tokenizer={fast_dir}"]
    flags = [arg for item in sets for arg in ("--set", item)]
    for run, steps in (("full", 4), ("resumed", 2)):
        train("--config", name, "--checkpoint-dir", str(root / run), "--max-steps", str(steps), *flags)
    out = train(
        "--config", name, "--checkpoint-dir", str(root / "resumed"), "--max-steps", "4", "--resume",
        *flags,
    )
    assert "resuming at step 2" in out
    return name, root


def test_resume_continues_exactly(runs):
    _, root = runs
    full, resumed = (read_metrics(root / run / "metrics.csv") for run in ("full", "resumed"))
    assert [row["step"] for row in resumed] == [row["step"] for row in full] == [1, 2, 3, 4]
    for got, want in zip(resumed, full):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["step"], key)
    a, b = (load_keras_policy(root / run / "export" / "policy.keras") for run in ("full", "resumed"))
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-6, err_msg=x.path)


def outcome(policy, observation):
    """The policy's actions, or the reason it gave none."""
    try:
        return policy.infer(observation)["actions"]
    except UndecodableActions as error:
        return str(error)


def test_export_and_checkpoints_serve_alike(runs):
    name, root = runs
    run = root / "resumed"
    model = load_keras_policy(run / "export" / "policy.keras")
    expected_type = {"pi05_demo": "pi05", "pi0_fast_demo": "pi0_fast"}[name]
    assert model.model_type == expected_type
    frame = ProceduralDataset(1, image_size=32)[0]
    observation = {"image": frame["image"], "state": frame["state"], "prompt": frame["prompt"]}
    options = {"fixed_noise": True, "seed": 0} if name == "pi05_demo" else {"max_decoding_steps": 24}
    outcomes = [
        outcome(Policy.from_checkpoint(path, **options), observation)
        for path in (run, run / "4", run / "export" / "policy.keras")
    ]
    if name == "pi05_demo":
        assert outcomes[0].shape == (HORIZON, 8)  # the raw robot keeps the model's action_dim
        for other in outcomes[1:]:
            np.testing.assert_allclose(other, outcomes[0], rtol=1e-5, atol=1e-6)
        return
    # π0-FAST: the checkpoints and the export carry the run's tokenizer and decode alike
    # (4 steps teach no valid action chunk yet: then alike is the same reason for none).
    assert model.tokenizer.tokenizer is not None and model.tokenizer.tokenizer.max_len == 80
    assert (run / "4" / "model_assets" / "tokenizer" / "fast").is_dir()
    for other in outcomes[1:]:
        assert_same(other, outcomes[0])


def assert_same(got, expected):
    if isinstance(expected, str):
        assert got == expected
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


CLIENT = """
from openpi_client.websocket_client_policy import WebsocketClientPolicy

observation = {k: np.asarray(v) if k != "prompt" else v for k, v in ARGS["observation"].items()}
observation["image"] = {k: np.asarray(v, np.uint8) for k, v in ARGS["observation"]["image"].items()}
try:
    reply = {"actions": WebsocketClientPolicy("127.0.0.1", ARGS["port"]).infer(observation)["actions"].tolist()}
except Exception as raised:
    reply = {"error": str(raised)}
print(json.dumps(reply))
"""


def test_the_fast_export_serves_openpis_client(runs):
    name, root = runs
    if name != "pi0_fast_demo":
        pytest.skip("the π0 family's serving through the client: test_serving_server.py")
    export = root / "resumed" / "export" / "policy.keras"
    server = ServerProcess([export, "--max-decoding-steps", "24"]).start()
    frame = ProceduralDataset(1, image_size=32)[0]
    observation = {"image": frame["image"], "state": frame["state"], "prompt": frame["prompt"]}
    plain = {
        "image": {k: v.tolist() for k, v in observation["image"].items()},
        "state": observation["state"].tolist(),
        "prompt": observation["prompt"],
    }
    try:
        reply = run_client(CLIENT, {"port": server.wait_ready().port, "observation": plain})
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]
    expected = outcome(Policy.from_checkpoint(export, max_decoding_steps=24), observation)
    if "error" in reply:
        reply = reply["error"].removeprefix("Error in inference server:\ninternal error: ")
    else:
        reply = np.asarray(reply["actions"])
    assert_same(reply, expected)
