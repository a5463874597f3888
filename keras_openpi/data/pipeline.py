"""The full transform chains of training and of a policy, in openpi's order."""

from keras_openpi.data.transforms import ExtractFASTActions
from keras_openpi.data.transforms import Group
from keras_openpi.data.transforms import InjectDefaultPrompt
from keras_openpi.data.transforms import Normalize
from keras_openpi.data.transforms import PadStatesAndActions
from keras_openpi.data.transforms import ResizeImages
from keras_openpi.data.transforms import TokenizeFASTInputs
from keras_openpi.data.transforms import TokenizePrompt
from keras_openpi.data.transforms import Unnormalize


def uses_quantile_norm(model_type):
    """openpi normalizes π0 with z-scores and π0.5 / π0-FAST with quantiles."""
    return model_type != "pi0"


def model_transforms(
    model_type,
    *,
    tokenizer,
    action_dim,
    image_size=(224, 224),
    default_prompt=None,
    discrete_state_input=None,
    action_horizon=None,
):
    """openpi's `ModelTransformFactory` for π0, π0.5 and π0-FAST.

    π0 / π0.5 inputs: `InjectDefaultPrompt → ResizeImages → TokenizePrompt →
    PadStatesAndActions`, no outputs. π0-FAST inputs: `InjectDefaultPrompt →
    ResizeImages → TokenizeFASTInputs` (state and actions are not padded: the
    FAST tokens hold them); outputs: `ExtractFASTActions` (generated token
    ids → (H, action_dim) chunk).

    Args:
        model_type: `pi0`, `pi05` or `pi0_fast`.
        tokenizer: π0 / π0.5: has `tokenize(prompt, state=None)` (its length is
            the model's `max_token_len`); π0-FAST: a `FASTPromptTokenizer`.
        action_dim: the model's state/action width.
        image_size: `(height, width)` of the model's cameras.
        default_prompt: the prompt of samples that have none.
        discrete_state_input: π0.5 puts the state into the prompt; defaults to
            True for `pi05` (openpi's `pi05_libero` sets it False).
        action_horizon: π0-FAST only (needed): H of the decoded chunks.

    Returns:
        `Group(inputs, outputs)`.
    """
    if model_type not in ("pi0", "pi05", "pi0_fast"):
        raise ValueError(
            f"model transforms exist for 'pi0', 'pi05' and 'pi0_fast', got {model_type!r}."
        )
    if model_type == "pi0_fast":
        if discrete_state_input is not None:
            raise ValueError("discrete_state_input is a π0.5 option; model_type is 'pi0_fast'.")
        if action_horizon is None:
            raise ValueError("model_type 'pi0_fast' needs action_horizon (H of the decoded chunks).")
        return Group(
            inputs=(
                InjectDefaultPrompt(default_prompt),
                ResizeImages(*image_size),
                TokenizeFASTInputs(tokenizer),
            ),
            outputs=(ExtractFASTActions(tokenizer, action_horizon, action_dim),),
        )
    if discrete_state_input is None:
        discrete_state_input = model_type == "pi05"
    if discrete_state_input and model_type != "pi05":
        raise ValueError("discrete_state_input is a π0.5 option; model_type is 'pi0'.")
    return Group(
        inputs=(
            InjectDefaultPrompt(default_prompt),
            ResizeImages(*image_size),
            TokenizePrompt(tokenizer, discrete_state_input=discrete_state_input),
            PadStatesAndActions(action_dim),
        )
    )


def build_transforms(*, robot, model, norm_stats=None, use_quantiles=False, repack=Group()):
    """The chains a trainer and a policy apply, in openpi's order.

    inputs: `repack.inputs → robot.inputs → Normalize → model.inputs`;
    outputs: `model.outputs → Unnormalize → robot.outputs → repack.outputs`.
    The policy's output dict must still hold the input `state` for
    `Unnormalize` (and for `AbsoluteActions`), as openpi's policy keeps it.

    Args:
        robot: `Group` of the robot (`keras_openpi.data.robots.get_robot`).
        model: `Group` of the model (`model_transforms`).
        norm_stats: `{key: NormStats}`, or None to skip normalization.
        use_quantiles: quantile normalization (`uses_quantile_norm(model_type)`).
        repack: `Group` renaming a dataset's keys to the robot's.

    Returns:
        `Group(inputs, outputs)`.
    """
    return Group(
        inputs=(
            *repack.inputs,
            *robot.inputs,
            Normalize(norm_stats, use_quantiles),
            *model.inputs,
        ),
        outputs=(
            *model.outputs,
            Unnormalize(norm_stats, use_quantiles),
            *robot.outputs,
            *repack.outputs,
        ),
    )
