"""π0 and π0.5: a PaliGemma VLM plus a flow-matching action expert."""

import keras
from keras import ops

from keras_openpi.backend import CompiledProgram
from keras_openpi.backend.sequencing import layer_sequencing_default
from keras_openpi.backend.train_step import StepLogsMixin
from keras_openpi.data.augment import augment_images
from keras_openpi.finetuning import FinetuningMixin
from keras_openpi.layers.gemma_mixture import GemmaMixture
from keras_openpi.layers.masks import make_attention_mask
from keras_openpi.layers.siglip import SigLIPEncoder
from keras_openpi.layers.time_embedding import sinusoidal_time_embedding
from keras_openpi.models.observation import IMAGE_KEYS
from keras_openpi.models.observation import pad_last_axis
from keras_openpi.models.observation import prepare_observation
from keras_openpi.models.variants import PALIGEMMA_VOCABULARY_SIZE
from keras_openpi.models.variants import resolve_gemma_variant
from keras_openpi.models.variants import resolve_siglip_variant


@keras.saving.register_keras_serializable(package="keras_openpi")
class Pi0(FinetuningMixin, StepLogsMixin, keras.Model):
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
        seed: seed of the generator that draws noise and time.
        augment: in training, augment the images as openpi does (`augment_images`).
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
        super().__init__(**kwargs)
        # === Config ===
        self.paligemma_variant = paligemma_variant
        self.action_expert_variant = action_expert_variant
        self.vision_variant = vision_variant
        self.vocabulary_size = vocabulary_size
        self.action_dim = action_dim
        self.action_horizon = action_horizon
        self.max_token_len = max_token_len or (200 if pi05 else 48)
        self.pi05 = pi05
        self.image_keys = tuple(image_keys)
        self.image_resolution = tuple(image_resolution)
        self.seed = seed
        self.augment = augment
        vlm = resolve_gemma_variant(paligemma_variant)
        expert = resolve_gemma_variant(action_expert_variant)
        for key in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if vlm[key] != expert[key]:
                raise ValueError(
                    f"The VLM and the action expert must share {key!r}: "
                    f"{vlm[key]} != {expert[key]}."
                )
        vision = resolve_siglip_variant(vision_variant)
        self.expert_width = expert["width"]

        # === Layers ===
        dtype = self.dtype_policy
        self.vision_encoder = SigLIPEncoder(
            **vision,
            image_size=self.image_resolution,
            output_dim=vlm["width"],
            dtype=dtype,
            name="vision_encoder",
        )
        self.gemma = GemmaMixture(
            experts=[
                {"name": "vlm", "width": vlm["width"], "mlp_dim": vlm["mlp_dim"]},
                {
                    "name": "action_expert",
                    "width": expert["width"],
                    "mlp_dim": expert["mlp_dim"],
                    "adaptive_norm_dim": expert["width"] if pi05 else None,
                },
            ],
            depth=vlm["depth"],
            num_query_heads=vlm["num_heads"],
            num_key_value_heads=vlm["num_kv_heads"],
            head_dim=vlm["head_dim"],
            vocabulary_size=vocabulary_size,
            dtype=dtype,
            name="gemma",
        )

        def dense(units, name):
            return keras.layers.Dense(
                units, kernel_initializer="lecun_normal", dtype=dtype, name=name
            )

        width = expert["width"]
        self.action_in_proj = dense(width, "action_in_proj")
        self.action_out_proj = dense(action_dim, "action_out_proj")
        if pi05:
            self.time_mlp_in = dense(width, "time_mlp_in")
            self.time_mlp_out = dense(width, "time_mlp_out")
        else:
            self.state_proj = dense(width, "state_proj")
            self.action_time_mlp_in = dense(width, "action_time_mlp_in")
            self.action_time_mlp_out = dense(width, "action_time_mlp_out")
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")
        self._sample_program = CompiledProgram(self, self._sample_actions)
        self.build()
        self.enable_sequencing(layer_sequencing_default())

    def build(self, input_shape=None):
        if self.built:
            return
        width = self.expert_width
        self.vision_encoder.build()
        self.gemma.build()
        self.action_in_proj.build((None, None, self.action_dim))
        self.action_out_proj.build((None, None, width))
        if self.pi05:
            self.time_mlp_in.build((None, width))
            self.time_mlp_out.build((None, width))
        else:
            self.state_proj.build((None, self.action_dim))
            self.action_time_mlp_in.build((None, None, 2 * width))
            self.action_time_mlp_out.build((None, None, width))
        self.built = True

    # === Observation ===

    def prepare_observation(self, observation):
        """Validates `observation` and brings it to the model's shapes (see `prepare_observation`)."""
        return prepare_observation(
            observation,
            self.image_keys,
            self.image_resolution,
            self.action_dim,
            self.max_token_len,
        )

    def dummy_observation(self, batch_size=1):
        """An all-zero observation with the model's shapes (for tracing, tests and warm-up)."""
        height, width = self.image_resolution
        return {
            "image": {
                k: ops.zeros((batch_size, height, width, 3)) for k in self.image_keys
            },
            "image_mask": {k: ops.ones((batch_size,), "bool") for k in self.image_keys},
            "state": ops.zeros((batch_size, self.action_dim)),
            "tokenized_prompt": ops.zeros((batch_size, self.max_token_len), "int32"),
            "tokenized_prompt_mask": ops.ones((batch_size, self.max_token_len), "bool"),
        }

    # === Prefix and suffix ===

    def embed_prefix(self, obs):
        """Image tokens of every camera, then the prompt tokens.

        Args:
            obs: a prepared observation (see `prepare_observation`).

        Returns:
            `(tokens (B, P, D), input_mask (B, P) bool, ar_mask (P,) bool)`;
            the prefix attends to itself bidirectionally (ar all false).
        """
        tokens, masks = [], []
        for image, image_mask in zip(obs["images"], obs["image_masks"]):
            image_tokens = self.vision_encoder(image)
            tokens.append(image_tokens)
            masks.append(
                ops.broadcast_to(image_mask[:, None], ops.shape(image_tokens)[:2])
            )
        tokens.append(self.gemma.embed_tokens(obs["tokens"]))
        masks.append(obs["token_mask"])
        tokens = [ops.cast(t, self.compute_dtype) for t in tokens]
        tokens = ops.concatenate(tokens, axis=1)
        input_mask = ops.concatenate(masks, axis=1)
        return tokens, input_mask, ops.zeros((tokens.shape[1],), "bool")

    def embed_suffix(self, obs, noisy_actions, time):
        """The action-expert tokens for noisy actions `x_t` at flow time `t`.

        Returns:
            `(tokens (B, S, D_e), input_mask (B, S), ar_mask (S,), adarms_cond)`
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
        return tokens, input_mask, ops.array(ar, "bool"), adarms_cond

    # === Flow matching ===

    def predict_velocity(self, obs, noisy_actions, time):
        """One joint forward of prefix and suffix: the velocity v_t, (B, H, action_dim)."""
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        suffix, suffix_mask, suffix_ar, cond = self.embed_suffix(
            obs, noisy_actions, time
        )
        input_mask = ops.concatenate([prefix_mask, suffix_mask], axis=1)
        ar_mask = ops.concatenate([prefix_ar, suffix_ar], axis=0)
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
        obs = self.prepare_observation(observation)
        if training and self.augment:
            images = augment_images(dict(zip(self.image_keys, obs["images"])), self.seed_generator)
            obs = {**obs, "images": [images[k] for k in self.image_keys]}
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

    # === Fine-tuning groups (see FinetuningMixin) ===

    def finetuning_groups(self):
        """The layers of each fine-tuning group and the linear maps LoRA adapts."""
        blocks = self.gemma.decoder_blocks

        def expert(index, extra_layers=()):
            experts = [block.experts[index] for block in blocks]
            lora = []
            for e in experts:
                attention, ffw = e.attention, e.feed_forward
                lora += [attention.query, attention.key, attention.value]
                lora += [attention.output_projection, ffw.gate, ffw.up, ffw.down]
            layers = [*extra_layers, *experts, self.gemma.final_norms[index]]
            return {"layers": layers, "lora": lora}

        if self.pi05:
            projections = [self.time_mlp_in, self.time_mlp_out]
        else:
            projections = [self.state_proj, self.action_time_mlp_in, self.action_time_mlp_out]
        return {
            "vision": {"layers": [self.vision_encoder]},
            "vlm": expert(0, [self.gemma.token_embedding]),
            "action_expert": expert(1),
            "projections": {"layers": [self.action_in_proj, self.action_out_proj, *projections]},
        }

    def remat_layers(self):
        """Rematerialized by `enable_remat`: the Gemma decoder blocks and SigLIP blocks."""
        return [*self.gemma.decoder_blocks, *self.vision_encoder.blocks]

    def row_chunked_layers(self):
        """Computed in chunks of rows under remat (JAX): every expert's feed-forward."""
        return [e.feed_forward for block in self.gemma.decoder_blocks for e in block.experts]

    # === Keras training API ===

    def call(self, observation, training=None):
        """The policy: sampled actions (B, H, action_dim) for an observation.

        During `fit` the loss is computed in `compute_loss` (it needs the target
        actions); there `call` only validates the batch and returns zeros, so
        that no sampling work is wasted inside the training step.
        """
        if training:
            obs = self.prepare_observation(observation)
            batch = ops.shape(obs["state"])[0]
            return ops.zeros((batch, self.action_horizon, self.action_dim))
        return self.sample_actions(observation)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Mean flow-matching loss of the batch `(observation, actions)`."""
        if y is None:
            raise ValueError(
                "Pi0 trains on (observation, actions) pairs; the dataset gave no actions."
            )
        loss = self.flow_matching_loss(x, y, training=training)
        if sample_weight is not None:
            weight = ops.reshape(ops.cast(sample_weight, loss.dtype), (-1, 1))
            loss = loss * weight
        return ops.mean(loss) + ops.cast(sum(self.losses), "float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "paligemma_variant": self.paligemma_variant,
                "action_expert_variant": self.action_expert_variant,
                "vision_variant": self.vision_variant,
                "vocabulary_size": self.vocabulary_size,
                "action_dim": self.action_dim,
                "action_horizon": self.action_horizon,
                "max_token_len": self.max_token_len,
                "pi05": self.pi05,
                "image_keys": list(self.image_keys),
                "image_resolution": list(self.image_resolution),
                "seed": self.seed,
                "augment": self.augment,
            }
        )
        return config
