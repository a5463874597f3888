"""`PaliGemmaPolicy`: what π0, π0.5 and π0-FAST share, and the contract they keep."""

import keras
from keras import ops

from keras_openpi.backend.train_step import StepLogsMixin
from keras_openpi.finetuning import FinetuningMixin
from keras_openpi.layers.gemma_mixture import GemmaMixture
from keras_openpi.layers.image_augmentation import ImageAugmentation
from keras_openpi.layers.siglip import SigLIPEncoder
from keras_openpi.models.observation import prepare_images
from keras_openpi.models.observation import prepare_prompt
from keras_openpi.models.preset_io import PresetMixin
from keras_openpi.models.variants import resolve_gemma_variant
from keras_openpi.models.variants import resolve_siglip_variant

# openpi's LoRA variants of the Gemmas: `gemma_2b_lora` and `gemma_300m_lora`.
OPENPI_VLM_LORA_RANK = 16
OPENPI_ACTION_EXPERT_LORA_RANK = 32


class PaliGemmaPolicy(PresetMixin, FinetuningMixin, StepLogsMixin, keras.Model):
    """A PaliGemma-based vision-language-action policy: SigLIP, a Gemma with its experts.

    The base of `Pi0` (π0 and π0.5) and `Pi0Fast`. It owns the layers they
    share (the SigLIP `vision_encoder`, the `gemma` mixture whose expert 0
    is the VLM, the `image_augmentation` of training, the `seed_generator`
    of noise and sampling) and implements the contract serving and training
    use, the same for every policy:

    - `prepare_observation(observation, training=False)`: openpi's
      `preprocess_observation`: checked, resized, padded; augmented when
      `training` and the model's `augment` are on.
    - `dummy_observation(batch_size=1)`: an all-zero observation.
    - `embed_prefix(obs)`: the image tokens of every camera, then the prompt
      tokens: `(tokens (B, P, D), input_mask (B, P) bool, ar_mask (B, P) bool)`.
    - `unreduced_loss(observation, actions=None, training=False)`: openpi's
      `compute_loss` before the batch mean (π0: (B, H); π0-FAST: (B,)).
    - `compute_loss(x, y, ...)`: Keras' hook, the mean of `unreduced_loss`
      (what `fit` minimizes; `y` is the actions, unused by π0-FAST).
    - `sample_actions(observation, **options)`: (B, action_horizon,
      action_dim) float32 actions, a backend tensor (normalized, as the
      model was trained).
    - the fine-tuning declarations: `finetuning_groups()` (`vision`, `vlm`,
      one group per action expert, `projections`), `default_lora_targets()`,
      `remat_layers()`, `row_chunked_layers()`;
    - keras-hub presets (`PresetMixin`): `save_to_preset(dir)`,
      `from_preset(dir_or_handle)`; `from_paligemma(backbone_or_preset)`:
      the VLM and vision tower of a keras-hub `PaliGemmaBackbone`.

    Subclasses build their heads after calling this constructor, then call
    `self.build()` and `self.enable_sequencing(layer_sequencing_default())`.

    Args:
        paligemma_variant: the VLM expert, a name in `GEMMA_VARIANTS` or a
            dict with keys `width`, `depth`, `mlp_dim`, `num_heads`,
            `num_kv_heads`, `head_dim`.
        vision_variant: the SigLIP encoder, `<size>/<patch>` (e.g. `So400m/14`)
            or a dict with keys `width`, `depth`, `mlp_dim`, `num_heads`, `patch_size`.
        vocabulary_size: token embedding rows (PaliGemma: 257152).
        action_dim: width of state and actions.
        action_horizon: H, actions per chunk.
        max_token_len: L, the prompt (token sequence) length.
        image_keys: camera names, in the order their tokens enter the prefix.
        image_resolution: `(height, width)` the encoder takes.
        seed: seed of the noise / sampling generator; the augmentation's is `seed + 1`.
        augment: in training, augment the images as openpi does (`ImageAugmentation`).
        action_experts: the Gemma experts after the VLM, as `GemmaMixture`
            expert dicts (`name`, `width`, `mlp_dim`, `adaptive_norm_dim`).
            Not part of the config: the subclass derives them from its own.
        **kwargs: `keras.Model` arguments, e.g. `dtype="mixed_bfloat16"`, `name`.
    """

    def __init__(
        self,
        paligemma_variant,
        vision_variant,
        vocabulary_size,
        action_dim,
        action_horizon,
        max_token_len,
        image_keys,
        image_resolution,
        seed=None,
        augment=False,
        action_experts=(),
        **kwargs,
    ):
        super().__init__(**kwargs)
        # === Config ===
        self.paligemma_variant = paligemma_variant
        self.vision_variant = vision_variant
        self.vocabulary_size = vocabulary_size
        self.action_dim = action_dim
        self.action_horizon = action_horizon
        self.max_token_len = max_token_len
        self.image_keys = tuple(image_keys)
        self.image_resolution = tuple(image_resolution)
        self.seed = seed
        self.augment = augment
        vlm = resolve_gemma_variant(paligemma_variant)
        vision = resolve_siglip_variant(vision_variant)
        self.vlm_width = vlm["width"]

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
                *action_experts,
            ],
            depth=vlm["depth"],
            num_query_heads=vlm["num_heads"],
            num_key_value_heads=vlm["num_kv_heads"],
            head_dim=vlm["head_dim"],
            vocabulary_size=vocabulary_size,
            dtype=dtype,
            name="gemma",
        )
        self.image_augmentation = ImageAugmentation(
            seed=None if seed is None else seed + 1, name="image_augmentation"
        )
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    @classmethod
    def from_paligemma(cls, backbone, **kwargs):
        """This policy with a keras-hub PaliGemma's VLM and vision tower, as openpi starts π0.

        Args:
            backbone: a `keras_hub.models.PaliGemmaBackbone`, or a preset to
                load one from (a local directory, `kaggle://`, `hf://`).
            **kwargs: more constructor arguments (`action_dim`,
                `action_horizon`, ...; π0: `action_expert_variant`, `pi05`),
                not the ones the backbone fixes.

        Returns:
            the policy; weights the backbone does not have (π0's action expert
            and projections) freshly initialized.

        Example:
        >>> model = Pi0.from_paligemma("/presets/pali_gemma_3b_224")  # doctest: +SKIP
        """
        from keras_openpi.models.paligemma_weights import policy_from_paligemma

        return policy_from_paligemma(cls, backbone, **kwargs)

    def build(self, input_shape=None):
        if self.built:
            return
        self.vision_encoder.build()
        self.gemma.build()
        self.build_heads()
        self.built = True

    def build_heads(self):
        """Builds the subclass's own layers (projections); called once by `build`."""

    # openpi's model type, `"pi0"`, `"pi05"` or `"pi0_fast"` (set by the subclass).
    model_type = None

    # === Observation ===

    def prepare_observation(self, observation, training=False):
        """openpi's `preprocess_observation`: the observation checked and brought to the model's shapes.

        Args:
            observation: an openpi observation dict: `image` `{camera: (B, h, w, 3)}`
                (float in [-1, 1] or uint8), `image_mask` `{camera: (B,)}`,
                `tokenized_prompt` (B, L), `tokenized_prompt_mask` (B, L), and
                what the model reads besides (π0: `state`; π0-FAST in
                training: `token_ar_mask`, `token_loss_mask`). Cameras the
                model was not built for are ignored.
            training: augment the images when the model's `augment` is on
                (and, for π0-FAST, require the loss's token masks).

        Returns:
            dict with `images` (list of (B, H, W, 3) float32), `image_masks`
            (list of (B,) bool), `tokens` (B, L) int32, `token_mask` (B, L)
            bool, and the model's own entries (π0: `state`; π0-FAST:
            `token_ar_mask`, `token_loss_mask`).

        Raises:
            ValueError: naming the key and the expected shape.
        """
        return self._prepare(observation, for_loss=training, augment=training)

    def _prepare(self, observation, for_loss, augment):
        images, image_masks = prepare_images(observation, self.image_keys, self.image_resolution)
        tokens, token_mask = prepare_prompt(observation, self.max_token_len)
        obs = {"images": images, "image_masks": image_masks, "tokens": tokens, "token_mask": token_mask}
        prompt_shape = tuple(observation["tokenized_prompt"].shape)
        obs.update(self.prepare_extras(observation, prompt_shape, for_loss))
        if augment and self.augment:
            augmented = self.image_augmentation(dict(zip(self.image_keys, images)), training=True)
            obs["images"] = [augmented[k] for k in self.image_keys]
        return obs

    def prepare_extras(self, observation, prompt_shape, for_loss):
        """The subclass's own prepared entries (π0: `state`); see `prepare_observation`.

        Args:
            observation: the observation dict.
            prompt_shape: the (checked) shape (B, L) of its `tokenized_prompt`.
            for_loss: whether the observation feeds a loss.
        """
        return {}

    def dummy_observation(self, batch_size=1):
        """An all-zero observation with the model's shapes (for tracing, tests and warm-up)."""
        height, width = self.image_resolution
        return {
            "image": {k: ops.zeros((batch_size, height, width, 3)) for k in self.image_keys},
            "image_mask": {k: ops.ones((batch_size,), "bool") for k in self.image_keys},
            "tokenized_prompt": ops.zeros((batch_size, self.max_token_len), "int32"),
            "tokenized_prompt_mask": ops.ones((batch_size, self.max_token_len), "bool"),
        }

    # === Prefix ===

    def embed_prefix(self, obs):
        """Image tokens of every camera (bidirectional), then the prompt tokens.

        Args:
            obs: a prepared observation (see `prepare_observation`).

        Returns:
            `(tokens (B, P, D), input_mask (B, P) bool, ar_mask (B, P) bool)`:
            `ar_mask` is true where a token starts a new causal block (see
            `make_attention_mask`): false on the images, the prompt's
            `token_ar_mask` (π0-FAST's postfix) or false (π0's prompt).
        """
        tokens, masks, ars = [], [], []
        for image, image_mask in zip(obs["images"], obs["image_masks"]):
            image_tokens = self.vision_encoder(image)
            shape = ops.shape(image_tokens)[:2]
            tokens.append(image_tokens)
            masks.append(ops.broadcast_to(image_mask[:, None], shape))
            ars.append(ops.zeros(shape, "bool"))
        tokens.append(self.gemma.embed_tokens(obs["tokens"]))
        masks.append(obs["token_mask"])
        token_ar = obs.get("token_ar_mask")
        ars.append(
            ops.zeros(ops.shape(obs["tokens"]), "bool") if token_ar is None else ops.cast(token_ar, "bool")
        )
        tokens = [ops.cast(t, self.compute_dtype) for t in tokens]
        return (
            ops.concatenate(tokens, axis=1),
            ops.concatenate(masks, axis=1),
            ops.concatenate(ars, axis=1),
        )

    # === Training ===

    def unreduced_loss(self, observation, actions=None, training=False):
        """openpi's `compute_loss`, before the batch mean (see the subclass)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define unreduced_loss() to train as a PaliGemmaPolicy."
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras' loss hook: the mean of `unreduced_loss(x, y)`, each example weighted by `sample_weight`."""
        loss = self.unreduced_loss(x, y, training=training)
        if sample_weight is not None:
            weight = ops.cast(sample_weight, loss.dtype)
            loss = loss * ops.reshape(weight, (-1,) + (1,) * (len(loss.shape) - 1))
        return ops.mean(loss) + ops.cast(sum(self.losses), "float32")

    # === Inference ===

    def sample_actions(self, observation, **options):
        """(B, action_horizon, action_dim) float32 actions for an observation (see the subclass)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define sample_actions() to serve as a PaliGemmaPolicy."
        )

    # === Fine-tuning declarations (see FinetuningMixin) ===

    def finetuning_groups(self):
        """`vision` (SigLIP), `vlm` (the Gemma's expert 0 with the token embedding),
        one group per action expert, and `projections` (`projection_layers()`, if any).

        The Gemma groups list their linear maps for LoRA (attention query, key,
        value, output; feed-forward gate, up, down) with openpi's LoRA ranks.
        """
        blocks = self.gemma.decoder_blocks

        def expert(index, extra_layers=(), openpi_rank=None):
            experts = [block.experts[index] for block in blocks]
            lora = []
            for e in experts:
                attention, ffw = e.attention, e.feed_forward
                lora += [attention.query, attention.key, attention.value]
                lora += [attention.output_projection, ffw.gate, ffw.up, ffw.down]
            layers = [*extra_layers, *experts, self.gemma.final_norms[index]]
            return {"layers": layers, "lora": lora, "openpi_lora_rank": openpi_rank}

        groups = {
            "vision": {"layers": [self.vision_encoder]},
            "vlm": expert(0, [self.gemma.token_embedding], OPENPI_VLM_LORA_RANK),
        }
        for index, config in enumerate(self.gemma.expert_configs[1:], start=1):
            groups[config["name"]] = expert(index, openpi_rank=OPENPI_ACTION_EXPERT_LORA_RANK)
        projections = self.projection_layers()
        if projections:
            groups["projections"] = {"layers": projections}
        return groups

    def projection_layers(self):
        """The layers outside SigLIP and the Gemma (π0's action and state projections)."""
        return []

    def default_lora_targets(self):
        """The VLM and every action expert (openpi's `*_lora` variants adapt them all)."""
        return tuple(config["name"] for config in self.gemma.expert_configs)

    def remat_layers(self):
        """Rematerialized by `enable_remat`: the Gemma decoder blocks and SigLIP blocks."""
        return [*self.gemma.decoder_blocks, *self.vision_encoder.blocks]

    def row_chunked_layers(self):
        """Computed in chunks of rows under remat (JAX): every expert's feed-forward."""
        return [e.feed_forward for block in self.gemma.decoder_blocks for e in block.experts]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "paligemma_variant": self.paligemma_variant,
                "vision_variant": self.vision_variant,
                "vocabulary_size": self.vocabulary_size,
                "action_dim": self.action_dim,
                "action_horizon": self.action_horizon,
                "max_token_len": self.max_token_len,
                "image_keys": list(self.image_keys),
                "image_resolution": list(self.image_resolution),
                "seed": self.seed,
                "augment": self.augment,
            }
        )
        return config
