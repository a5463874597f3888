"""Robot input/output mappings (openpi's `policies/*_policy.py`) and their registry."""

from keras_openpi.data.robots import aloha
from keras_openpi.data.robots import droid
from keras_openpi.data.robots import libero
from keras_openpi.data.robots import metaworld
from keras_openpi.data.robots.aloha import AlohaInputs
from keras_openpi.data.robots.aloha import AlohaOutputs
from keras_openpi.data.robots.droid import DroidInputs
from keras_openpi.data.robots.droid import DroidOutputs
from keras_openpi.data.robots.libero import LiberoInputs
from keras_openpi.data.robots.libero import LiberoOutputs
from keras_openpi.data.robots.metaworld import MetaworldInputs
from keras_openpi.data.robots.metaworld import MetaworldOutputs
from keras_openpi.data.robots.raw import RawInputs
from keras_openpi.data.robots.raw import RawOutputs
from keras_openpi.data.transforms import AbsoluteActions
from keras_openpi.data.transforms import DeltaActions
from keras_openpi.data.transforms import Group

ROBOTS = ("aloha", "droid", "libero", "metaworld", "raw")
DELTA_ACTION_MASKS = {
    "aloha": aloha.DELTA_ACTION_MASK,
    "droid": droid.DELTA_ACTION_MASK,
    "libero": libero.DELTA_ACTION_MASK,
}


def get_robot(name, *, model_type="pi0", delta_actions=False, adapt_to_pi=True):
    """The input and output transforms of a robot, as openpi's data configs build them.

    Args:
        name: `aloha`, `droid`, `libero`, `metaworld` or `raw`.
        model_type: `pi0`, `pi05` or `pi0_fast` (the camera layout of DROID and LIBERO).
        delta_actions: train on actions relative to the state for the robot's
            joints (`DeltaActions` in, `AbsoluteActions` out) with openpi's mask
            (`DELTA_ACTION_MASKS`); openpi's `pi0_aloha` does, `pi0_aloha_sim`,
            `pi0_libero` and `pi0_droid` do not.
        adapt_to_pi: ALOHA only: convert joints and grippers to π's space.

    Returns:
        `Group(inputs, outputs)`.

    Example:
    >>> inputs, outputs = get_robot("libero")
    >>> sorted(inputs[0](libero.make_libero_example())["image"])
    ['base_0_rgb', 'left_wrist_0_rgb', 'right_wrist_0_rgb']
    """
    droid.check_model_type(model_type)
    if name == "aloha":
        group = Group([AlohaInputs(adapt_to_pi)], [AlohaOutputs(adapt_to_pi)])
    elif name == "droid":
        group = Group([DroidInputs(model_type)], [DroidOutputs()])
    elif name == "libero":
        group = Group([LiberoInputs(model_type)], [LiberoOutputs()])
    elif name == "metaworld":
        group = Group([MetaworldInputs(model_type)], [MetaworldOutputs()])
    elif name == "raw":
        group = Group([RawInputs()], [RawOutputs()])
    else:
        raise ValueError(f"unknown robot {name!r}; choose one of {ROBOTS}.")
    if delta_actions:
        if name not in DELTA_ACTION_MASKS:
            raise ValueError(
                f"robot {name!r} has no delta-action mask; build DeltaActions(make_bool_mask(...)) "
                "yourself."
            )
        mask = DELTA_ACTION_MASKS[name]
        group = group.push(inputs=[DeltaActions(mask)], outputs=[AbsoluteActions(mask)])
    return group


__all__ = [
    "AlohaInputs",
    "AlohaOutputs",
    "DELTA_ACTION_MASKS",
    "DroidInputs",
    "DroidOutputs",
    "LiberoInputs",
    "LiberoOutputs",
    "MetaworldInputs",
    "MetaworldOutputs",
    "ROBOTS",
    "RawInputs",
    "RawOutputs",
    "get_robot",
]
