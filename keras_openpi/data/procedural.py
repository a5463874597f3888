"""A procedural tabletop "reach" task, rendered with numpy: the dataset of the demo.

Coloured shapes lie on a table seen from above; the prompt names one of them
("move to the red square") and the expert moves the end effector straight to
it at a fixed speed, then closes the gripper. Distractors have other colours
and shapes, so the prompt decides where to go. Each frame has three cameras
(openpi's names): `base_0_rgb` sees the whole table, the two wrist cameras
look down at the effector with two zooms.

Coordinates: the table is `[-1, 1]^2` (x right, y up). The state is
`(x, y, gripper)` with gripper 1 open and 0 closed; the action of a frame is
the expert's next state (an absolute position target), so an action chunk is
the expert's next H states.
"""

import numpy as np

COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 200),
    "yellow": (240, 200, 30),
}
SHAPES = ("square", "circle", "triangle")
# Camera name -> half the side of the square it sees, in table units.
CAMERAS = {"base_0_rgb": 1.1, "left_wrist_0_rgb": 0.45, "right_wrist_0_rgb": 0.25}
STATE_NAMES = ("x", "y", "gripper")

TABLE_RGB = (196, 164, 120)
FLOOR_RGB = (70, 70, 76)
EFFECTOR_RGB = (30, 30, 30)
OBJECT_SIZE = 0.12  # half side / radius
EFFECTOR_RADIUS = 0.05


def _shape_mask(shape, dx, dy, size):
    if shape == "square":
        return (np.abs(dx) <= size) & (np.abs(dy) <= size)
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    # An upward triangle with apex (0, size) and base from (-size, -size) to (size, -size).
    return (dy >= -size) & (np.abs(dx) <= (size - dy) / 2)


def render_view(objects, position, gripper, center, half_extent, image_size):
    """Renders one top-down camera of the scene.

    Args:
        objects: list of dicts with `color`, `shape` and `position` (2,).
        position: (2,) effector position.
        gripper: gripper opening in [0, 1].
        center: (2,) point the camera looks at.
        half_extent: half the side of the square the camera sees.
        image_size: side of the square image in pixels.

    Returns:
        (image_size, image_size, 3) uint8 image.

    Example:
    >>> cube = {"color": "red", "shape": "square", "position": (0.5, 0.5)}
    >>> image = render_view([cube], (0.0, 0.0), 1.0, (0.0, 0.0), 1.0, 64)
    >>> image[16, 48].tolist()  # the pixel at (0.5, 0.5)
    [214, 39, 40]
    """
    pixels = (np.arange(image_size) + 0.5) / image_size * 2.0 - 1.0
    x = center[0] + half_extent * pixels[None, :]
    y = center[1] - half_extent * pixels[:, None]
    x, y = np.broadcast_arrays(x, y)
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = FLOOR_RGB
    image[(np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)] = TABLE_RGB
    for obj in objects:
        dx, dy = x - obj["position"][0], y - obj["position"][1]
        image[_shape_mask(obj["shape"], dx, dy, OBJECT_SIZE)] = COLORS[obj["color"]]
    # The effector: a ring, with two fingers whose gap is the gripper opening.
    dx, dy = x - position[0], y - position[1]
    radius = np.sqrt(dx * dx + dy * dy)
    ring = np.abs(radius - EFFECTOR_RADIUS) <= 0.015
    gap = 0.02 + 0.05 * float(gripper)
    fingers = (np.abs(np.abs(dx) - gap) <= 0.015) & (dy >= 0) & (dy <= 0.09)
    image[ring | fingers] = EFFECTOR_RGB
    return image


def render_cameras(objects, position, gripper, image_size):
    """Every camera of `CAMERAS` for one frame: dict name -> (S, S, 3) uint8."""
    centers = {"base_0_rgb": (0.0, 0.0)}
    return {
        name: render_view(
            objects, position, gripper, centers.get(name, position), half, image_size
        )
        for name, half in CAMERAS.items()
    }


def _place_objects(rng, num_objects):
    combos = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(combos), size=num_objects, replace=False)
    positions = []
    while len(positions) < num_objects:
        candidate = rng.uniform(-0.75, 0.75, size=2)
        if all(np.linalg.norm(candidate - p) >= 0.35 for p in positions):
            positions.append(candidate)
    return [
        {"color": combos[i][0], "shape": combos[i][1], "position": p.astype(np.float32)}
        for i, p in zip(chosen, positions)
    ]


def make_reach_episode(seed, index=0, image_size=96, num_objects=3, speed=0.1, hold_steps=2):
    """One expert episode of the reach task, deterministic in `(seed, index)`.

    Args:
        seed: dataset seed.
        index: episode index (episode `i` is the same whatever the dataset size).
        image_size: side of every camera image in pixels.
        num_objects: shapes on the table (distinct colour-shape pairs, at most 12).
        speed: distance the expert moves per step.
        hold_steps: frames recorded after arrival (gripper closed).

    Returns:
        dict with `prompt` (str), `objects` (list of dicts), `target` (2,)
        float32, `state` (T, 3) float32, `actions` (T, 3) float32 (the next
        state; the last frame holds), `images` {camera: (T, S, S, 3) uint8}.

    Example:
    >>> episode = make_reach_episode(seed=0, index=0, image_size=32)
    >>> episode["prompt"], episode["state"].shape, episode["images"]["base_0_rgb"].shape
    ('move to the blue circle', (17, 3), (17, 32, 32, 3))
    """
    if not 1 <= num_objects <= len(COLORS) * len(SHAPES):
        raise ValueError(
            f"'num_objects' must be in [1, {len(COLORS) * len(SHAPES)}], got {num_objects}."
        )
    rng = np.random.default_rng([seed, index])
    objects = _place_objects(rng, num_objects)
    goal = objects[rng.integers(num_objects)]
    target = goal["position"]
    position = rng.uniform(-0.9, 0.9, size=2)
    while np.linalg.norm(position - target) < 0.3:
        position = rng.uniform(-0.9, 0.9, size=2)

    states = [np.array([*position, 1.0])]
    holding = 0
    while holding < hold_steps:
        offset = target - position
        distance = np.linalg.norm(offset)
        if distance <= speed:
            position, holding = target.astype(np.float64), holding + 1
        else:
            position = position + offset / distance * speed
        states.append(np.array([*position, 0.0 if holding else 1.0]))
    states = np.stack(states).astype(np.float32)
    frames = [render_cameras(objects, s[:2], s[2], image_size) for s in states]
    return {
        "prompt": f"move to the {goal['color']} {goal['shape']}",
        "objects": objects,
        "target": target,
        "state": states,
        "actions": np.concatenate([states[1:], states[-1:]]),
        "images": {name: np.stack([f[name] for f in frames]) for name in CAMERAS},
    }


def make_reach_episodes(num_episodes, seed=0, start=0, **kwargs):
    """Episodes `start ... start + num_episodes - 1` of the reach task.

    Keyword arguments go to `make_reach_episode`. Different `start` ranges
    give disjoint splits of one seed (e.g. a held-out set at `start=10**6`).
    """
    return [make_reach_episode(seed, start + i, **kwargs) for i in range(num_episodes)]


def reach_batch(episodes, tokenizer, action_dim, action_horizon):
    """Every frame of `episodes` as one openpi observation batch and its action chunks.

    The chunk of frame t is the episode's `actions[t : t + H]`, repeating the
    last action past the end (the robot holds still); state and actions are
    zero-padded to `action_dim`, as openpi's `PadStatesAndActions` does.

    Args:
        episodes: episodes from `make_reach_episodes`.
        tokenizer: has `tokenize_batch(prompts) -> (ids, mask)` of shape (B, L).
        action_dim: the model's state/action width (>= 3).
        action_horizon: H.

    Returns:
        `(observation, actions)`: numpy arrays that `model.fit(x=observation,
        y=actions)` takes: `{"image": {camera: (B, S, S, 3) uint8}, "image_mask":
        {camera: (B,) bool}, "state": (B, action_dim) float32, "tokenized_prompt":
        (B, L) int32, "tokenized_prompt_mask": (B, L) bool}` and (B, H,
        action_dim) float32 actions.

    Example:
    >>> from keras_openpi.tokenizers import ByteTokenizer
    >>> episodes = make_reach_episodes(2, seed=0, image_size=32)
    >>> observation, actions = reach_batch(episodes, ByteTokenizer(32), 8, 10)
    >>> observation["state"].shape, actions.shape
    ((35, 8), (35, 10, 8))
    """
    width = len(STATE_NAMES)
    if action_dim < width:
        raise ValueError(f"'action_dim' must be at least {width}, got {action_dim}.")
    states, chunks, prompts = [], [], []
    for episode in episodes:
        length = len(episode["state"])
        steps = np.minimum(np.arange(length)[:, None] + np.arange(action_horizon), length - 1)
        chunks.append(episode["actions"][steps])
        states.append(episode["state"])
        prompts += [episode["prompt"]] * length
    pad = [(0, 0), (0, action_dim - width)]
    tokens, token_mask = tokenizer.tokenize_batch(prompts)
    images = {
        name: np.concatenate([e["images"][name] for e in episodes]) for name in CAMERAS
    }
    observation = {
        "image": images,
        "image_mask": {name: np.ones((len(prompts),), bool) for name in CAMERAS},
        "state": np.pad(np.concatenate(states), pad),
        "tokenized_prompt": tokens,
        "tokenized_prompt_mask": token_mask,
    }
    return observation, np.pad(np.concatenate(chunks), [(0, 0)] + pad)
