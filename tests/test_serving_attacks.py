"""Hostile requests against a `Policy`: each is refused with a reason naming the key.

A request is anything msgpack can carry, so every value a robot's transforms
read is attacked here: degenerate images, states of the wrong rank, type or
magnitude, masks that are not bools, prompts that are not text. After each
refusal the policy still answers a good request. Actions are never returned
non-finite. (The websocket side is in test_serving_protocol.py and, through
openpi's own client, test_serving_server.py.)
"""

import numpy as np
import pytest
from serving_support import ConstantModel
from serving_support import make_request
from serving_support import model_request
from serving_support import nan_where_state_is_negative
from serving_support import tiny_pi0
from serving_support import write_norm_stats

from keras_openpi import Policy
from keras_openpi.data.normalize import NormStats
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.robots.aloha import make_aloha_example
from keras_openpi.data.robots.droid import make_droid_example
from keras_openpi.data.robots import ROBOTS
from keras_openpi.data.robots.libero import make_libero_example
from keras_openpi.data.robots.metaworld import make_metaworld_example
from keras_openpi.data.transforms import Unnormalize
from keras_openpi.serving.model_inputs import ModelInputs
from keras_openpi.serving.model_inputs import value_limit
from keras_openpi.serving.policy import NonFiniteActions
from keras_openpi.serving.prompt import resolve_tokenizer
from keras_openpi.serving.robots import REQUEST_SPECS
from keras_openpi.serving.robots import robot_transforms

IMAGE = "'image/base_0_rgb' must be one RGB image, \\(h, w, 3\\) or \\(3, h, w\\), uint8 or float"
STATE = "'state' must be a numeric array of rank 1"
LIMIT = "the model's float32 needs finite values within ±1.84e\\+19"
CAMERA = "base_0_rgb"
MASK = "'image_mask/base_0_rgb' must be one bool, got "


@pytest.fixture(scope="module")
def model():
    return tiny_pi0()


@pytest.fixture(scope="module")
def norm_stats(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stats")
    write_norm_stats(directory)
    return load_norm_stats(directory)


def policy_for(model, robot="raw", **transform_args):
    inputs, outputs = robot_transforms(
        robot, model, tokenizer=resolve_tokenizer(None, model), **transform_args
    )
    return Policy(model, transforms=inputs, output_transforms=outputs, seed=0, warmup=False)


@pytest.fixture(scope="module")
def policy(model, norm_stats):
    return policy_for(model, norm_stats=norm_stats)


def image(**cameras):
    request = make_request(0)
    return {**request, "image": {**request["image"], **cameras}}


def replace(**values):
    return {**make_request(0), **values}


EMPTY = "got an empty uint8 array of shape"
HOSTILE = {
    # Images: empty, degenerate, not an image at all.
    "image_0x0": (
        image(base_0_rgb=np.zeros((0, 0, 3), np.uint8)),
        IMAGE + r" in \[0, 1\], got an empty uint8 array of shape \(0, 0, 3\)\.$",
    ),
    "image_no_width": (image(base_0_rgb=np.zeros((32, 0, 3), np.uint8)), EMPTY + r" \(32, 0, 3\)"),
    "image_chw_empty": (image(base_0_rgb=np.zeros((3, 0, 5), np.uint8)), EMPTY + r" \(3, 0, 5\)"),
    "image_one_row": (
        image(base_0_rgb=np.zeros((1, 1000, 3), np.uint8)),
        "'image/base_0_rgb' of 1x1000 pixels is too thin to resize to the model's 32x32 "
        r"\(it would be 0x32 pixels\)",
    ),
    "image_one_column": (
        image(base_0_rgb=np.zeros((1000, 1, 3), np.uint8)),
        r"1000x1 pixels is too thin .* \(it would be 32x0 pixels\)",
    ),
    "image_batched": (
        image(base_0_rgb=np.zeros((1, 32, 32, 3), np.uint8)),
        IMAGE + r".*got uint8 array of shape \(1, 32, 32, 3\)",
    ),
    "image_scalar": (image(base_0_rgb=np.uint8(3)), IMAGE + ".*got uint8 scalar"),
    "image_str": (image(base_0_rgb="pixels"), IMAGE + ".*got str"),
    "image_bytes": (image(base_0_rgb=b"pixels"), IMAGE + ".*got bytes"),
    "image_none": (image(base_0_rgb=None), IMAGE + ".*got NoneType"),
    "image_dict": (image(base_0_rgb={"a": 1}), IMAGE + ".*got dict"),
    "image_bool": (
        image(base_0_rgb=np.zeros((32, 32, 3), bool)),
        IMAGE + r".*got bool array of shape \(32, 32, 3\)",
    ),
    "image_text_array": (
        image(base_0_rgb=np.array(["a", "b", "c"])),
        IMAGE + r".*got <U1 array of shape \(3,\)",
    ),
    "image_nan": (
        image(base_0_rgb=np.full((32, 32, 3), np.nan, np.float32)),
        r"'image/base_0_rgb' has a non-finite value \(nan\) at index \(0, 0, 0\)",
    ),
    "images_empty": (replace(image={}), "'image' must be a dict {camera: image}, got an empty"),
    "images_array": (
        replace(image=np.zeros((32, 32, 3), np.uint8)),
        r"'image' must be a dict {camera: image}, got uint8 array of shape \(32, 32, 3\)",
    ),
    "images_none": (replace(image=None), "'image' must be a dict {camera: image}, got NoneType"),
    # Masks: a dict of one bool per camera.
    "mask_not_dict": (
        replace(image_mask=True),
        "'image_mask' must be a dict {camera: bool} over the cameras of 'image', got bool",
    ),
    "mask_list": (replace(image_mask=[True]), "'image_mask' must be a dict .*, got list"),
    "mask_text": (replace(image_mask={CAMERA: "no"}), MASK + "str"),
    "mask_float": (replace(image_mask={CAMERA: 0.5}), MASK + "float"),
    "mask_none": (replace(image_mask={CAMERA: None}), MASK + "NoneType"),
    "mask_two": (
        replace(image_mask={CAMERA: np.array([True, False])}),
        MASK + r"bool array of shape \(2,\)",
    ),
    "mask_int_2": (replace(image_mask={CAMERA: 2}), MASK + "int"),
    "mask_unknown_camera": (
        replace(image_mask={"top": True}),
        "'image_mask' has the camera 'top', which is not in 'image' "
        r"\['base_0_rgb', 'left_wrist_0_rgb', 'right_wrist_0_rgb'\]",
    ),
    # States: rank 1, numeric, not empty, finite, of a magnitude the model's dtype holds.
    "state_scalar": (replace(state=np.float32(1.0)), STATE + ", got float32 scalar"),
    "state_0d": (replace(state=np.array(1.0)), STATE + r", got float64 array of shape \(\)"),
    "state_python_float": (replace(state=1.0), STATE + ", got float"),
    "state_empty": (
        replace(state=np.zeros(0, np.float32)),
        STATE + " with at least one value, got it empty",
    ),
    "state_2d": (
        replace(state=np.zeros((1, 5), np.float32)),
        STATE + r", got float32 array of shape \(1, 5\)",
    ),
    "state_str": (replace(state="0.1 0.2"), STATE + ", got str"),
    "state_bytes": (replace(state=b"\x00\x01"), STATE + ", got bytes"),
    "state_text_array": (
        replace(state=np.array(["a", "b"])),
        STATE + r", got <U1 array of shape \(2,\)",
    ),
    "state_mixed_list": (replace(state=[0.1, "a"]), STATE + r", got <U32 array of shape \(2,\)"),
    "state_ragged_list": (replace(state=[[0.1], [0.2, 0.3]]), STATE + ", got a ragged list"),
    "state_list_nan": (
        replace(state=[0.1, float("nan")]),
        r"'state' has a non-finite value \(nan\) at index \(1,\)",
    ),
    "state_dict": (replace(state={"a": np.zeros(2)}), STATE + ", got dict"),
    "state_none": (replace(state=None), STATE + ", got NoneType"),
    "state_bool": (
        replace(state=np.array([True, False])),
        STATE + r", got bool array of shape \(2,\)",
    ),
    "state_datetime": (
        replace(state=np.zeros(5, "M8[s]")),
        STATE + r", got datetime64\[s\] array of shape \(5,\)",
    ),
    "state_float32_3e38": (
        replace(state=np.full(5, 3e38, np.float32)),
        r"'state' has the value 3e\+38 at index \(0,\) after the robot's transforms and "
        "normalization; " + LIMIT,
    ),
    "state_float64_1e300": (
        replace(state=np.full(5, 1e300)),
        r"'state' has the value 9.99999e\+299 at index \(0,\) .*" + LIMIT,  # normalized
    ),
    # Prompts: text; bytes must be UTF-8.
    "prompt_not_utf8": (
        replace(prompt=b"\xff\xfe"),
        r"'prompt' must be UTF-8 text, got bytes that are not UTF-8 \(invalid start byte at "
        r"byte 0\); send the prompt as a str\.$",
    ),
    "prompt_0d_not_utf8": (replace(prompt=np.array(b"\xff")), "'prompt' must be UTF-8 text"),
    "prompt_text_array": (
        replace(prompt=np.array(["a", "b"])),
        r"'prompt' must be a str, got <U1 array of shape \(2,\)",
    ),
    "prompt_list": (replace(prompt=["pick"]), "'prompt' must be a str, got list"),
    "prompt_dict": (replace(prompt={"a": "b"}), "'prompt' must be a str, got dict"),
    # Prompt token ids sent by the client.
    "tokens_float": (
        replace(tokenized_prompt=np.zeros(3, np.float32)),
        r"'tokenized_prompt' must be a \(l,\) int .* got float32 array of shape \(3,\)",
    ),
    "tokens_scalar": (
        replace(tokenized_prompt=np.int32(3)),
        "'tokenized_prompt' must be a .* got int32 scalar",
    ),
    "tokens_str": (replace(tokenized_prompt="abc"), "'tokenized_prompt' must be a .* got str"),
    "tokens_huge_id": (
        replace(tokenized_prompt=np.array([2**64 - 1], np.uint64)),
        r"'tokenized_prompt' ids must be in \[0, 259\)",
    ),
    "tokens_mask_text": (
        replace(tokenized_prompt=np.array([1, 2]), tokenized_prompt_mask="ab"),
        "'tokenized_prompt_mask' must be a bool array of the shape of 'tokenized_prompt'",
    ),
    # Keys: str only.
    "bytes_key": (
        {**make_request(0), b"state": 1},
        "the observation's keys must be str, got the bytes key b'state' in 'the observation'",
    ),
    "nested_int_key": (
        replace(image={5: np.zeros((32, 32, 3), np.uint8)}),
        "the observation's keys must be str, got the int key 5 in 'image'",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request_is_refused_naming_the_key(policy, case):
    request, message = HOSTILE[case]
    with pytest.raises(ValueError, match=message):
        policy.infer(request)
    actions = policy.infer(make_request(1))["actions"]  # the policy goes on
    assert actions.shape == (4, 8) and np.isfinite(actions).all()


def test_actions_sent_in_a_request_are_ignored(policy):
    request = make_request(2)
    expected = policy.infer(request, noise=np.zeros((4, 8), np.float32))["actions"]
    for actions in (np.float32(1.0), "left", np.zeros((2, 99)), {"a": None}):
        reply = policy.infer({**request, "actions": actions}, noise=np.zeros((4, 8), np.float32))
        np.testing.assert_allclose(reply["actions"], expected, atol=1e-6)


@pytest.mark.parametrize("stats", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize(
    "state",
    [np.full(5, 3e38, np.float32), np.full(5, 1e300)],
    ids=["float32_3e38", "float64_1e300"],
)
def test_finite_state_that_overflows_is_a_bad_request(model, norm_stats, stats, state):
    policy = policy_for(model, norm_stats=norm_stats if stats else None)
    with pytest.raises(ValueError) as refused:
        policy.infer(replace(state=state))
    message = str(refused.value)
    value = float(message.removeprefix("'state' has the value ").split()[0])
    # The raw state, or (with norm stats) the state over (std + 1e-6), std = 1 in dim 0.
    assert value == pytest.approx(float(state[0]) / (1 + 1e-6 if stats else 1), rel=1e-5)
    assert message.startswith(f"'state' has the value {value:.6g} at index (0,)")
    assert "float32 needs finite values within ±1.84e+19" in message
    # The largest state the model's dtype allows still gives finite actions.
    actions = policy.infer(replace(state=np.full(5, 1e19, np.float32)))["actions"]
    assert np.isfinite(actions).all()


ROBOT_CASES = {
    "droid_joints": (
        "droid",
        "observation/joint_position",
        np.float32(1),
        "'observation/joint_position' must be a numeric array of rank 1, got float32 scalar",
    ),
    "droid_gripper": (
        "droid",
        "observation/gripper_position",
        "open",
        "'observation/gripper_position' must be a numeric array of rank 0 or 1, got str",
    ),
    "droid_image": (
        "droid",
        "observation/wrist_image_left",
        np.zeros((0, 0, 3), np.uint8),
        "'observation/wrist_image_left' must be one RGB image.*got an empty uint8 array",
    ),
    "droid_overflow": (
        "droid",
        "observation/joint_position",
        np.full(7, 1e300),
        r"'state' has the value 1e\+300 at index \(0,\)",
    ),
    "droid_prompt": ("droid", "prompt", b"\xff", "'prompt' must be UTF-8 text"),
    "libero_state": (
        "libero",
        "observation/state",
        None,
        "'observation/state' must be a numeric array of rank 1, got NoneType",
    ),
    "libero_image": (
        "libero",
        "observation/image",
        np.zeros((224, 0, 3), np.uint8),
        "'observation/image' must be one RGB image.*got an empty uint8 array",
    ),
    "aloha_images": (
        "aloha",
        "images",
        np.zeros((3, 3, 3)),
        r"'images' must be a dict {camera: image}, got float64 array of shape \(3, 3, 3\)",
    ),
    "aloha_camera": (
        "aloha",
        "images",
        {"cam_high": np.zeros((3, 0, 0), np.uint8)},
        "'images/cam_high' must be one RGB image.*got an empty uint8 array",
    ),
    "aloha_state": (
        "aloha",
        "state",
        np.float32(1),
        "'state' must be a numeric array of rank 1, got float32 scalar",
    ),
    "metaworld_state": (
        "metaworld",
        "observation/state",
        np.float32(1),
        "'observation/state' must be a numeric array of rank 1, got float32 scalar",
    ),
    "metaworld_image": (
        "metaworld",
        "observation/image",
        np.zeros((64, 0, 3), np.uint8),
        "'observation/image' must be one RGB image.*got an empty uint8 array",
    ),
}
EXAMPLES = {
    "aloha": make_aloha_example,
    "droid": make_droid_example,
    "libero": make_libero_example,
    "metaworld": make_metaworld_example,
}


def test_every_robot_has_a_request_spec():
    assert sorted(REQUEST_SPECS) == sorted(ROBOTS)


def test_a_metaworld_request_is_served(model):
    actions = policy_for(model, robot="metaworld").infer(make_metaworld_example())["actions"]
    assert actions.shape == (model.action_horizon, 4)
    assert np.isfinite(actions).all()


@pytest.mark.parametrize("case", sorted(ROBOT_CASES))
def test_robot_requests_are_checked(model, case):
    robot, key, value, message = ROBOT_CASES[case]
    with pytest.raises(ValueError, match=message):
        policy_for(model, robot=robot).infer({**EXAMPLES[robot](), key: value})


# === Value range after the cast to the model's dtype ===


def test_value_limit_follows_the_models_dtype():
    assert value_limit("float32") == pytest.approx(1.8446744e19, rel=1e-6)
    assert value_limit("bfloat16") == pytest.approx(1.8410680e19, rel=1e-6)
    assert value_limit("float16") == pytest.approx(255.9375, rel=1e-6)
    sample = {
        "image": {"base_0_rgb": np.zeros((4, 4, 3), np.uint8)},
        "state": np.array([300.0]),
        "tokenized_prompt": np.array([1]),
    }
    assert ModelInputs(("base_0_rgb",), (4, 4), 3, 5, 10, "float32")(sample)["state"][0] == 300.0
    half = ModelInputs(("base_0_rgb",), (4, 4), 3, 5, 10, "float16")
    with pytest.raises(ValueError, match=r"'state' has the value 300 .* float16 .* within ±256"):
        half(sample)
    huge = {**sample, "image": {"base_0_rgb": np.full((4, 4, 3), 1e20, np.float32)}}
    with pytest.raises(ValueError, match=r"'image/base_0_rgb' has the value 1e\+20 at index"):
        ModelInputs(("base_0_rgb",), (4, 4), 3, 5, 10)(huge)


# === Non-finite actions are never returned ===


def test_non_finite_model_actions_raise_and_return_nothing():
    policy = Policy(ConstantModel(nan_where_state_is_negative))
    assert policy.infer(model_request(0.5))["actions"].tolist() == [[1.0] * 3] * 2
    with pytest.raises(
        NonFiniteActions,
        match=r"^the model's actions have 2 non-finite values of 6 \(NaN or inf\); "
        r"no actions were sent\.$",
    ):
        policy.infer(model_request(-0.5))
    with pytest.raises(NonFiniteActions, match="actions have 2 non-finite values of 12"):
        policy.infer_batch([model_request(0.5), model_request(-0.5)])
    assert policy.infer(model_request(0.5))["actions"].tolist() == [[1.0] * 3] * 2


def test_actions_that_overflow_in_the_output_transforms_raise():
    stats = {"actions": NormStats(mean=np.zeros(3), std=np.full(3, 1e300))}
    policy = Policy(
        ConstantModel(lambda batch: 1e10), output_transforms=[Unnormalize(stats, strict=False)]
    )
    with pytest.raises(
        NonFiniteActions,
        match=r"the actions after the output transforms have 6 non-finite values of 6",
    ):
        policy.infer(model_request())


# === Start-up: a tokenizer that cannot serve the model ===


def test_tokenizer_file_that_cannot_serve_the_model_is_refused(tmp_path):
    import io
    import types

    import sentencepiece

    model = types.SimpleNamespace(model_type="pi0", vocabulary_size=259, max_token_len=16)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError) as refused:
        resolve_tokenizer(str(garbage), model)
    assert str(refused.value) == (
        f"the tokenizer {garbage} is not a SentencePiece .model file (SentencePiece cannot parse "
        "it); pass PaliGemma's tokenizer file."
    )
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["pick up the red cup", "put the towel in the basket"] * 8),
        model_writer=proto,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    wide = tmp_path / "wide.model"
    wide.write_bytes(proto.getvalue())
    with pytest.raises(ValueError) as refused:
        resolve_tokenizer(str(wide), model)
    assert str(refused.value) == (
        f"the tokenizer {wide} has 300 ids but the model's vocabulary has 259; pass the "
        "tokenizer the model was trained with."
    )
