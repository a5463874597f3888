"""Small models as data: the demo's π0 and the tiny π0, π0.5 and π0-FAST of the tests.

`SMALL_MODELS` maps a name to `(model type, constructor arguments)`;
`small_model(name, **overrides)` builds one. The full-size models are the
classes' defaults (openpi's `gemma_2b` + `gemma_300m`, SigLIP So400m/14).
"""

# A small π0 with openpi's architecture: the `demo` command and training config.
DEMO_GEMMA = dict(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16)
DEMO_MODEL = dict(
    paligemma_variant=DEMO_GEMMA,
    action_expert_variant=DEMO_GEMMA,
    vision_variant=dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=16),
    action_dim=8,
    action_horizon=10,
    max_token_len=32,
    image_resolution=(96, 96),
)

# Tiny models: every code path of the full-size ones, built and run in seconds on a CPU.
TINY_GEMMA = dict(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=8)
TINY_VISION = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=16)
TINY_PI0 = dict(
    paligemma_variant=TINY_GEMMA,
    action_expert_variant=dict(TINY_GEMMA, width=16, mlp_dim=32),
    vision_variant=TINY_VISION,
    vocabulary_size=64,
    action_dim=4,
    action_horizon=3,
    max_token_len=5,
    image_keys=("base_0_rgb", "left_wrist_0_rgb"),
    image_resolution=(32, 32),
    seed=0,
)
TINY_PI0_FAST = dict(
    paligemma_variant=TINY_GEMMA,
    vision_variant=TINY_VISION,
    vocabulary_size=64,
    action_dim=4,
    action_horizon=3,
    max_token_len=8,
    image_keys=("base_0_rgb", "wrist_0_rgb"),
    image_resolution=(32, 32),
    seed=0,
)

SMALL_MODELS = {
    "pi0_demo": ("pi0", dict(DEMO_MODEL, vocabulary_size=259)),
    "pi0_tiny": ("pi0", TINY_PI0),
    "pi05_tiny": ("pi0", dict(TINY_PI0, pi05=True)),
    "pi0_fast_tiny": ("pi0_fast", TINY_PI0_FAST),
}


def small_model(name, **overrides):
    """Builds the small model `name` of `SMALL_MODELS`, with `overrides` of its arguments.

    Example:
    >>> small_model("pi0_tiny", action_dim=6).action_dim
    6
    """
    if name not in SMALL_MODELS:
        raise ValueError(f"Unknown small model {name!r}; expected one of {sorted(SMALL_MODELS)}.")
    model_type, arguments = SMALL_MODELS[name]
    if model_type == "pi0_fast":
        from keras_openpi.models.pi0_fast import Pi0Fast as model_class
    else:
        from keras_openpi.models.pi0 import Pi0 as model_class
    return model_class(**{**arguments, **overrides})
