"""A policy's transform chains for a robot: openpi's `create_trained_policy` order.

inputs: request checks (`CheckRequest`, with the robot's `REQUEST_SPECS`) →
robot inputs → `Normalize` → model inputs (default prompt, resize, tokenize,
pad); outputs: `Unnormalize` → robot outputs. The robot mappings,
normalization and model transforms are `keras_openpi.data`'s, the same the
trainer applies, so a policy sees requests exactly as the model saw its
training samples. The model's own output transforms are left out: a
`Policy` samples with `model.sample_actions`, which gives actions for every
model (π0-FAST decodes its tokens itself, so openpi's `ExtractFASTActions`
would decode twice).
"""

from keras_openpi.data import pipeline
from keras_openpi.data.robots import ROBOTS
from keras_openpi.data.robots import get_robot
from keras_openpi.data.transforms import Group
from keras_openpi.data.transforms import TokenizeFASTInputs
from keras_openpi.data.transforms import TokenizePrompt
from keras_openpi.serving.prompt import PromptOrTokens
from keras_openpi.serving.request_checks import CheckRequest
from keras_openpi.serving.request_checks import RequestSpec

# What each robot's requests hold (see each robot's `*Inputs` in `keras_openpi.data.robots`).
REQUEST_SPECS = {
    "aloha": RequestSpec(image_maps=("images",), states={"state": (1,)}),
    "droid": RequestSpec(
        images=("observation/exterior_image_1_left", "observation/wrist_image_left"),
        states={"observation/joint_position": (1,), "observation/gripper_position": (0, 1)},
    ),
    "libero": RequestSpec(
        images=("observation/image", "observation/wrist_image"),
        states={"observation/state": (1,)},
    ),
    "metaworld": RequestSpec(
        images=("observation/image",), states={"observation/state": (1,)}
    ),
    "raw": RequestSpec(image_maps=("image",), image_masks=("image_mask",), states={"state": (1,)}),
}


def robot_transforms(
    robot,
    model,
    *,
    norm_stats=None,
    tokenizer=None,
    default_prompt=None,
    delta_actions=False,
    discrete_state_input=None,
):
    """The input and output transforms that serve `model` to `robot`.

    Args:
        robot: `aloha`, `droid`, `libero` or `raw` (the model's own layout:
            `image {camera: (h, w, 3) uint8}`, `state (s,)`, and `prompt` or
            `tokenized_prompt`; see `keras_openpi.data.robots`).
        model: the policy model (`model.model_type`: `pi0`, `pi05` or `pi0_fast`).
        norm_stats: `{key: NormStats}` (state and actions), or None.
        tokenizer: π0 / π0.5: has `tokenize(prompt, state=None)`; π0-FAST: its
            `FASTPromptTokenizer` (see `resolve_tokenizer`); or None (then
            requests must send `tokenized_prompt`).
        default_prompt: the prompt of requests that carry none.
        delta_actions: the model predicts actions relative to the state on the
            robot's delta mask (openpi's `pi0_aloha`); they are made absolute.
        discrete_state_input: π0.5 writes the state into the prompt; defaults
            to True for π0.5 models.

    Returns:
        `Group(inputs, outputs)`; the first input transform checks requests
        (`CheckRequest`).

    Example:
    >>> inputs, outputs = robot_transforms("raw", model)  # doctest: +SKIP
    """
    if robot not in ROBOTS:
        raise ValueError(f"unknown robot {robot!r}; choose one of {list(ROBOTS)}.")
    if robot not in REQUEST_SPECS:
        raise ValueError(
            f"robot {robot!r} has no request spec in keras_openpi.serving.robots.REQUEST_SPECS; "
            f"it has {sorted(REQUEST_SPECS)}."
        )
    model_type = model.model_type
    fast = model_type == "pi0_fast"
    model_group = pipeline.model_transforms(
        model_type,
        tokenizer=tokenizer,
        action_dim=model.action_dim,
        image_size=tuple(model.image_resolution),
        default_prompt=default_prompt,
        discrete_state_input=discrete_state_input,
        action_horizon=model.action_horizon if fast else None,
    )
    model_inputs = [
        PromptOrTokens(t) if isinstance(t, (TokenizePrompt, TokenizeFASTInputs)) else t
        for t in model_group.inputs
    ]
    inputs, outputs = pipeline.build_transforms(
        robot=get_robot(robot, model_type=model_type, delta_actions=delta_actions),
        model=Group(model_inputs),  # no model outputs: `model.sample_actions` gives actions
        norm_stats=norm_stats,
        use_quantiles=pipeline.uses_quantile_norm(model_type),
    )
    check = CheckRequest(REQUEST_SPECS[robot], tuple(model.image_resolution))
    return Group((check, *inputs), outputs)
