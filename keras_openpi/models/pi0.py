"""π0 and π0.5: a PaliGemma VLM plus a flow-matching action expert."""

import keras
from keras import ops

from keras_openpi.backend import CompiledProgram
from keras_openpi.backend.sequencing import layer_sequencing_default
from keras_openpi.layers.masks import make_attention_mask
from keras_openpi.layers.time_embedding import sinusoidal_time_embedding
from keras_openpi.models.observation import IMAGE_KEYS
from keras_openpi.models.observation import pad_last_axis
from keras_openpi.models.observation import prepare_state
from keras_openpi.models.paligemma_policy import PaliGemmaPolicy
from keras_openpi.models.variants import PALIGEMMA_VOCABULARY_SIZE
from keras_openpi.models.variants import resolve_gemma_variant


@keras.saving.register_keras_serializable(package="keras_openpi")
class Pi0(PaliGemmaPolicy):
    """π0 / π0.5 vision-language-action policy, numerically identical to openpi.

    The prefix (SigLIP tokens of every camera, then the embedded prompt) runs
    through the VLM expert with bidirectional attention; the suffix (π0: a
    state token and the noisy action chunk with the time mixed in; π0.5: the
    noisy actions, with the time entering through adaRMS norms) runs through
    the action expert, attending to the prefix. Training regresses the
    flow-matching velocity `noise - actions`; sampling integrates it from
    noise at t=1 to actions at t=0 with Euler steps, reusing the prefix's
    keys and values.

    Args:
        paligemma_variant: the VLM expert, a name in `GEMMA_VARIANTS`
            (`dummy`, `gemma_300m`, `gemma_2b`) or a dict with keys `width`,
            `depth`, `mlp_dim`, `num_heads`, `num_kv_heads`, `head_dim`.
        action_expert_variant: the action expert, same forms. Depth, heads
            and head dim must equal the VLM's.
        vision_variant: the SigLIP encoder, `<size>/<patch>` (e.g. `So400m/14`)
            or a dict with keys `width`, `depth`, `mlp_dim`, `num_heads`, `patch_size`.
        vocabulary_size: token embedding rows (PaliGemma: 257152).
        action_dim: width of state and actions (robot data is zero-padded).
        action_horizon: H, actions per chunk.
        max_token_len: prompt length L; defaults to 48 (π0) or 200 (π0.5).
        pi05: build π0.5 (adaRMS time conditioning, no state token).
        image_keys: camera names, in the order their tokens enter the prefix.
        image_resolution: `(height, width)` the encoder takes.
        seed: seed of the generator that draws noise and time (the
            augmentation's is `seed + 1`).
        augment: in training, augment the images as openpi does (`ImageAugmentation`).
        **kwargs: `keras.Model` arguments, e.g. `dtype="mixed_bfloat16"`, `name`.

    Example:
    >>> model = Pi0("dummy", "dummy", "tiny/16", vocabulary_size=1024,
    ...             action_dim=8, action_horizon=10, max_token_len=16)
    >>> observation = model.dummy_observation(batch_size=2)
    >>> model.sample_actions(observation, num_steps=2).shape
    (2, 10, 8)
    """

    def __init__(
        self,
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        vision_variant="So400m/14",
        vocabulary_size=PALIGEMMA_VOCABULARY_SIZE,
        action_dim=32,
        action_horizon=50,
        max_token_len=None,
        pi05=False,
        image_keys=IMAGE_KEYS,
        image_resolution=(224, 224),
        seed=None,
        augment=False,
        **kwargs,
    ):
        kwargs.setdefault("name", "pi05" if pi05 else "pi0")
        vlm = resolve_gemma_variant(paligemma_variant)
        expert = resolve_gemma_variant(action_expert_variant)
        for key in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if vlm[key] != expert[key]:
                raise ValueError(
                    f"The VLM and the action expert must share {key!r}: "
                    f"{vlm[key]} != {expert[key]}."
                )
        width = expert["width"]
        super().__init__(
            paligemma_variant=paligemma_variant,
            vision_variant=vision_variant,
            vocabulary_size=vocabulary_size,
            action_dim=action_dim,
            action_horizon=action_horizon,
            max_token_len=max_token_len or (200 if pi05 else 48),
            image_keys=image_keys,
            image_resolution=image_resolution,
            seed=seed,
            augment=augment,
            action_experts=[
                {
                    "name": "action_expert",
                    "width": width,
                    "mlp_dim": expert["mlp_dim"],
                    "adaptive_norm_dim": width if pi05 else None,
                }
            ],
            **kwargs,
        )
        # === Config ===
        self.action_expert_variant = action_expert_variant
        self.pi05 = pi05
        self.expert_width = width

        # === Layers ===
        def dense(units, name):
            return keras.layers.Dense(
                units, kernel_initializer="lecun_normal", dtype=self.dtype_policy, name=name
            )

        self.action_in_proj = dense(width, "action_in_proj")
        self.action_out_proj = dense(action_dim, "action_out_proj")
        if pi05:
            self.time_mlp_in = dense(width, "time_mlp_in")
            self.time_mlp_out = dense(width, "time_mlp_out")
        else:
            self.state_proj = dense(width, "state_proj")
            self.action_time_mlp_in = dense(width, "action_time_mlp_in")
            self.action_time_mlp_out = dense(width, "action_time_mlp_out")
        self._sample_program = CompiledProgram(self, self._sample_actions)
        self.build()
        self.enable_sequencing(layer_sequencing_default())

    def build_heads(self):
        width = self.expert_width
        self.action_in_proj.build((None, None, self.action_dim))
        self.action_out_proj.build((None, None, width))
        if self.pi05:
            self.time_mlp_in.build((None, width))
            self.time_mlp_out.build((None, width))
        else:
            self.state_proj.build((None, self.action_dim))
            self.action_time_mlp_in.build((None, None, 2 * width))
            self.action_time_mlp_out.build((None, None, width))

    @property
    def model_type(self):
        return "pi05" if self.pi05 else "pi0"

    # === Observation ===

    def prepare_extras(self, observation, prompt_shape, for_loss):
        """`state` (B, action_dim) float32, zero-padded."""
        return {"state": prepare_state(observation, self.action_dim)}

    def dummy_observation(self, batch_size=1):
        """An all-zero observation with the model's shapes (for tracing, tests and warm-up)."""
        return {
            **super().dummy_observation(batch_size),
            "state": ops.zeros((batch_size, self.action_dim)),
        }

    # === Prefix and suffix ===

    def embed_suffix(self, obs, noisy_actions, time):
        """The action-expert tokens for noisy actions `x_t` at flow time `t`.

        Returns:
            `(tokens (B, S, D_e), input_mask (B, S), ar_mask (B, S), adarms_cond)`
            with `adarms_cond` (B, D_e) for π0.5 and None for π0. π0's suffix is
            a state token (its own causal block) then the H action tokens (one
            block); π0.5's is the H action tokens only.
        """
        horizon = self.action_horizon
        time_embedding = sinusoidal_time_embedding(time, self.expert_width)
        time_embedding = ops.cast(time_embedding, self.compute_dtype)
        action_tokens = self.action_in_proj(noisy_actions)
        if self.pi05:
            cond = ops.silu(self.time_mlp_in(time_embedding))
            cond = ops.silu(self.time_mlp_out(cond))
            tokens, adarms_cond = action_tokens, cond
            ar = [True] + [False] * (horizon - 1)
        else:
            state_token = self.state_proj(obs["state"])[:, None, :]
            time_tokens = ops.repeat(time_embedding[:, None, :], horizon, axis=1)
            mixed = ops.concatenate([action_tokens, time_tokens], axis=-1)
            mixed = self.action_time_mlp_out(ops.silu(self.action_time_mlp_in(mixed)))
            tokens = ops.concatenate([state_token, mixed], axis=1)
            adarms_cond = None
            ar = [True, True] + [False] * (horizon - 1)
        input_mask = ops.ones(ops.shape(tokens)[:2], "bool")
        ar_mask = ops.broadcast_to(ops.array(ar, "bool")[None, :], ops.shape(input_mask))
        return tokens, input_mask, ar_mask, adarms_cond

    # === Flow matching ===

    def predict_velocity(self, obs, noisy_actions, time):
        """One joint forward of prefix and suffix: the velocity v_t, (B, H, action_dim)."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(
            obs, noisy_actions, time
        )
        input_mask = ops.concatenate([prefix_mask, suffix_mask], axis=1)
        ar_mask = ops.concatenate([prefix_ar, suffix_ar], axis=1)
        attention_mask = make_attention_mask(input_mask, ar_mask)
        positions = ops.cumsum(ops.cast(input_mask, "int32"), axis=1) - 1
        (_, suffix_out), _ = self.gemma(
            [prefix, suffix], positions, attention_mask, conds=[None, cond]
        )
        velocity = self.action_out_proj(suffix_out[:, -self.action_horizon :])
        return ops.cast(velocity, "float32")

    def _check_actions(self, actions, name="actions"):
        shape = tuple(actions.shape)
        expected = f"(B, {self.action_horizon}, a) with a <= {self.action_dim}"
        if len(shape) != 3 or shape[1] != self.action_horizon or shape[2] > self.action_dim:
            raise ValueError(f"{name!r} must have shape {expected}, got shape {shape}.")
        return pad_last_axis(ops.cast(actions, "float32"), self.action_dim)

    def unreduced_loss(self, observation, actions=None, training=False):
        """openpi's `compute_loss`: the flow-matching loss (B, H), noise and time drawn."""
        if actions is None:
            raise ValueError(
                f"{type(self).__name__} trains on (observation, actions) pairs; the dataset "
                "gave no actions."
            )
        return self.flow_matching_loss(observation, actions, training=training)

    def flow_matching_loss(self, observation, actions, noise=None, time=None, training=False):
        """openpi's `compute_loss`: per-(batch, step) squared velocity error.

        `x_t = t * noise + (1 - t) * actions`, target `u_t = noise - actions`,
        loss `mean((v_t - u_t) ** 2, axis=-1)` over all `action_dim` dims.

        Args:
            observation: an openpi observation dict.
            actions: (B, H, a) target actions, a <= action_dim (zero-padded).
            noise: optional (B, H, action_dim); drawn from N(0, 1) if omitted.
            time: optional (B,); drawn from Beta(1.5, 1) * 0.999 + 0.001 if omitted.
            training: augment the images first when the model's `augment` is on.

        Returns:
            (B, H) float32 loss.
        """
        obs = self.prepare_observation(observation, training=training)
        actions = self._check_actions(actions)
        batch = ops.shape(actions)[0]
        if noise is None:
            noise = keras.random.normal(
                ops.shape(actions), seed=self.seed_generator, dtype="float32"
            )
        noise = self._check_actions(noise, "noise")
        if time is None:
            time = keras.random.beta(
                (batch,), 1.5, 1.0, seed=self.seed_generator, dtype="float32"
            )
            time = time * 0.999 + 0.001
        time = ops.cast(time, "float32")
        t = time[:, None, None]
        noisy_actions = t * noise + (1.0 - t) * actions
        target = noise - actions
        velocity = self.predict_velocity(obs, noisy_actions, time)
        return ops.mean(ops.square(velocity - target), axis=-1)

    def sample_actions(self, observation, noise=None, num_steps=10):
        """Integrates the flow from noise (t=1) to actions (t=0) with Euler steps.

        The prefix runs once into a key/value cache; each of the `num_steps`
        steps runs only the action expert. On JAX the whole sampler is one
        compiled program (compiled once per input shape and `num_steps`).

        Args:
            observation: an openpi observation dict.
            noise: optional (B, H, action_dim) starting noise; N(0, 1) if omitted.
            num_steps: number of Euler steps.

        Returns:
            (B, action_horizon, action_dim) float32 actions.
        """
        obs = self.prepare_observation(observation)
        batch = obs["state"].shape[0]
        shape = (batch, self.action_horizon, self.action_dim)
        if noise is None:
            noise = keras.random.normal(shape, seed=self.seed_generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"'noise' must have shape {shape}, got {tuple(noise.shape)}.")
        return self._sample_program(obs, ops.cast(noise, "float32"), num_steps=int(num_steps))

    def _sample_actions(self, obs, noise, num_steps):
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        prefix_attention = make_attention_mask(prefix_mask, prefix_ar)
        prefix_positions = ops.cumsum(ops.cast(prefix_mask, "int32"), axis=1) - 1
        _, kv_cache = self.gemma([prefix, None], prefix_positions, prefix_attention)
        prefix_length = ops.sum(ops.cast(prefix_mask, "int32"), axis=1)[:, None]
        dt = -1.0 / num_steps

        def step(_, carry):
            x_t, time = carry
            batch_time = ops.broadcast_to(time, (x_t.shape[0],))
            suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(
                obs, x_t, batch_time
            )
            suffix_len = suffix.shape[1]
            to_prefix = ops.broadcast_to(
                prefix_mask[:, None, :], (x_t.shape[0], suffix_len, prefix.shape[1])
            )
            to_suffix = make_attention_mask(suffix_mask, suffix_ar)
            attention_mask = ops.concatenate([to_prefix, to_suffix], axis=-1)
            positions = (
                prefix_length + ops.cumsum(ops.cast(suffix_mask, "int32"), axis=1) - 1
            )
            (_, suffix_out), _ = self.gemma(
                [None, suffix],
                positions,
                attention_mask,
                conds=[None, cond],
                kv_cache=kv_cache,
            )
            velocity = self.action_out_proj(suffix_out[:, -self.action_horizon :])
            x_t = x_t + dt * ops.cast(velocity, "float32")
            return x_t, time + dt

        x_0, _ = ops.fori_loop(
            0, num_steps, step, (noise, ops.convert_to_tensor(1.0, "float32"))
        )
        return x_0

    # === Fine-tuning declarations (see PaliGemmaPolicy) ===

    def projection_layers(self):
        """The action projections and π0's state / action-time MLP or π0.5's time MLP."""
        if self.pi05:
            projections = [self.time_mlp_in, self.time_mlp_out]
        else:
            projections = [self.state_proj, self.action_time_mlp_in, self.action_time_mlp_out]
        return [self.action_in_proj, self.action_out_proj, *projections]

    # === Keras API ===

    def call(self, observation, training=None):
        """The policy: sampled actions (B, H, action_dim) for an observation.

        During `fit` the loss is computed in `compute_loss` (it needs the target
        actions); there `call` only validates the batch and returns zeros, so
        that no sampling work is wasted inside the training step.
        """
        if training:
            obs = self._prepare(observation, for_loss=True, augment=False)
            batch = ops.shape(obs["state"])[0]
            return ops.zeros((batch, self.action_horizon, self.action_dim))
        return self.sample_actions(observation)

    def get_config(self):
        config = super().get_config()
        config.update({"action_expert_variant": self.action_expert_variant, "pi05": self.pi05})
        return config
