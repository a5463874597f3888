"""π0-FAST: PaliGemma predicting FAST action tokens autoregressively."""

import keras
import numpy as np
from keras import ops

from keras_openpi.backend import CompiledProgram
from keras_openpi.backend.sampling import sample_categorical
from keras_openpi.backend.sampling import step_seed
from keras_openpi.backend.sequencing import layer_sequencing_default
from keras_openpi.layers.masks import make_attention_mask
from keras_openpi.models.fast_decoding import decode_step_mask
from keras_openpi.models.fast_decoding import left_to_right_align
from keras_openpi.models.observation import pad_last_axis
from keras_openpi.models.paligemma_policy import PaliGemmaPolicy
from keras_openpi.models.variants import PALIGEMMA_VOCABULARY_SIZE
from keras_openpi.tokenizers.fast import FASTDecodeError
from keras_openpi.tokenizers.fast_prompt_layer import FASTPromptTokenizerLayer

FAST_IMAGE_KEYS = ("base_0_rgb", "base_1_rgb", "wrist_0_rgb")
PALIGEMMA_EOS_TOKEN = 1


@keras.saving.register_keras_serializable(package="keras_openpi")
class Pi0Fast(PaliGemmaPolicy):
    """π0-FAST vision-language-action policy, numerically identical to openpi.

    One PaliGemma (SigLIP + Gemma) reads the image tokens of every camera and
    a token sequence laid out by `FASTPromptTokenizer`: a prefix
    `Task: ..., State: ...;\\n` (bidirectional) and, in training, a postfix
    `Action: <FAST tokens>|<eos>` (causal). Attention is prefix-LM, built
    from the token AR mask. Training is next-token cross-entropy on the
    postfix (`token_loss`); inference decodes tokens greedily or by sampling
    (`generate`) and turns them into an action chunk (`sample_actions`)
    with the `FASTPromptTokenizer` the model carries (`tokenizer`; saved
    with the model in `.keras` files, see `FASTPromptTokenizerLayer`).

    The weights have the paths of π0's VLM expert
    (`pi0_fast/gemma/decoder_block_0/vlm/attention/query/kernel`,
    `pi0_fast/vision_encoder/...`), so LoRA, freezing and the importer work
    the same way. The action width and horizon are only used to decode the
    FAST tokens.

    Args:
        paligemma_variant: the Gemma, a name in `GEMMA_VARIANTS` (`gemma_2b`
            for openpi's π0-FAST) or a dict with keys `width`, `depth`,
            `mlp_dim`, `num_heads`, `num_kv_heads`, `head_dim`.
        vision_variant: the SigLIP encoder, `<size>/<patch>` (e.g. `So400m/14`)
            or a dict with keys `width`, `depth`, `mlp_dim`, `num_heads`, `patch_size`.
        vocabulary_size: token embedding rows (PaliGemma: 257152).
        action_dim: D of the decoded action chunks.
        action_horizon: H of the decoded action chunks.
        max_token_len: L, the token sequence length (openpi: 250).
        image_keys: camera names, in the order their tokens enter the
            sequence (openpi uses the cameras the robot transform provides;
            its π0-FAST configs: `base_0_rgb`, `base_1_rgb`, `wrist_0_rgb`).
        image_resolution: `(height, width)` the encoder takes.
        eos_token_id: the id that ends a generated sequence (PaliGemma: 1).
        seed: seed of the sampling generator (the augmentation's is `seed + 1`).
        augment: in training, augment the images as openpi does (`ImageAugmentation`).
        tokenizer: the `FASTPromptTokenizer` the model is trained with (its
            `max_len` must be `max_token_len`), which `sample_actions` decodes
            with; None to set it later (`set_tokenizer`). In a config: the
            serialized `FASTPromptTokenizerLayer` (files in the `.keras` assets).
        **kwargs: `keras.Model` arguments, e.g. `dtype="mixed_bfloat16"`, `name`.

    Example:
    >>> model = Pi0Fast({"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8,
    ...                  "num_kv_heads": 1, "head_dim": 16}, "tiny/16",
    ...                 vocabulary_size=1024, max_token_len=16)
    >>> observation = model.dummy_observation(batch_size=2)
    >>> model.token_loss(observation).shape
    (2,)
    >>> model.generate(observation, max_decoding_steps=4).shape
    (2, 4)
    """

    def __init__(
        self,
        paligemma_variant="gemma_2b",
        vision_variant="So400m/14",
        vocabulary_size=PALIGEMMA_VOCABULARY_SIZE,
        action_dim=32,
        action_horizon=32,
        max_token_len=250,
        image_keys=FAST_IMAGE_KEYS,
        image_resolution=(224, 224),
        eos_token_id=PALIGEMMA_EOS_TOKEN,
        seed=None,
        augment=False,
        tokenizer=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "pi0_fast")
        super().__init__(
            paligemma_variant=paligemma_variant,
            vision_variant=vision_variant,
            vocabulary_size=vocabulary_size,
            action_dim=action_dim,
            action_horizon=action_horizon,
            max_token_len=max_token_len,
            image_keys=image_keys,
            image_resolution=image_resolution,
            seed=seed,
            augment=augment,
            **kwargs,
        )
        # === Config ===
        self.eos_token_id = eos_token_id

        # === Layers ===
        if isinstance(tokenizer, dict):
            tokenizer = keras.saving.deserialize_keras_object(tokenizer)
        if not isinstance(tokenizer, FASTPromptTokenizerLayer):
            tokenizer = FASTPromptTokenizerLayer(
                tokenizer, max_len=max_token_len, name="tokenizer"
            )
        self.tokenizer = tokenizer
        self._generate_program = CompiledProgram(self, self._generate)
        self.build()
        self.enable_sequencing(layer_sequencing_default())

    model_type = "pi0_fast"

    def set_tokenizer(self, tokenizer):
        """Carries `tokenizer` (a `FASTPromptTokenizer` with `max_len == max_token_len`) from now on."""
        self.tokenizer.set_tokenizer(tokenizer)

    # === Observation ===

    def prepare_extras(self, observation, prompt_shape, for_loss):
        """`token_ar_mask` (B, L) int32 and `token_loss_mask` (B, L) bool, padded.

        The AR mask (0 bidirectional prefix, 1 causal postfix) defaults to
        zeros and the loss mask to false; both are required `for_loss`.
        `state` is not read: π0-FAST reads the discretized state in the prompt.
        """
        extras = {}
        for key, dtype in (("token_ar_mask", "int32"), ("token_loss_mask", "bool")):
            value = observation.get(key)
            if value is None:
                if for_loss:
                    raise ValueError(
                        f"observation is missing the key {key!r}, which π0-FAST's token loss "
                        f"needs ((B, L) like 'tokenized_prompt'; FASTPromptTokenizer.tokenize "
                        f"gives it); it has {sorted(observation)}."
                    )
                value = ops.zeros(prompt_shape, dtype)
            elif tuple(value.shape) != prompt_shape:
                raise ValueError(
                    f"{key!r} must have the shape of 'tokenized_prompt' {prompt_shape}, "
                    f"got shape {tuple(value.shape)}."
                )
            extras[key] = pad_last_axis(ops.cast(value, dtype), self.max_token_len)
        return extras

    def dummy_observation(self, batch_size=1):
        """An all-zero observation with the model's shapes (for tracing, tests and warm-up)."""
        length = self.max_token_len
        return {
            **super().dummy_observation(batch_size),
            "token_ar_mask": ops.zeros((batch_size, length), "int32"),
            "token_loss_mask": ops.ones((batch_size, length), "bool"),
        }

    # === Training ===

    def token_loss(self, observation, training=False):
        """openpi's `Pi0FAST.compute_loss`: per-example next-token cross-entropy.

        One forward of the whole sequence but its last token, prefix-LM
        masked; token i predicts text token i + 1. The loss is the mean
        negative log-likelihood over the tokens where `token_loss_mask[:, 1:]`
        is true. As in openpi, the positions are `0 .. P - 2` for every
        example (masked cameras and padding take positions too, unlike in
        `generate`).

        Args:
            observation: an observation dict with `token_ar_mask` and `token_loss_mask`.
            training: augment the images first when the model's `augment` is on.

        Returns:
            (B,) float32 loss.
        """
        obs = self._prepare(observation, for_loss=True, augment=training)
        embeddings, input_mask, ar_mask = self.embed_prefix(obs)
        attention = make_attention_mask(input_mask, ar_mask)
        length = embeddings.shape[1]
        positions = ops.broadcast_to(
            ops.arange(length - 1, dtype="int32")[None, :],
            (ops.shape(embeddings)[0], length - 1),
        )
        (hidden,), _ = self.gemma([embeddings[:, :-1]], positions, attention[:, :-1, :-1])
        targets = obs["tokens"][:, 1:]
        logits = self.gemma.decode_logits(hidden[:, -targets.shape[1] :])
        log_probs = ops.log_softmax(logits, axis=-1)
        target_log_probs = ops.take_along_axis(log_probs, targets[:, :, None], axis=-1)[..., 0]
        loss_mask = ops.cast(obs["token_loss_mask"][:, 1:], "float32")
        total = ops.sum(target_log_probs * loss_mask, axis=-1)
        return -total / ops.maximum(ops.sum(loss_mask, axis=-1), 1.0)

    def unreduced_loss(self, observation, actions=None, training=False):
        """openpi's `compute_loss`: `token_loss` (B,); the actions are in the tokens, `actions` is unused."""
        return self.token_loss(observation, training=training)

    def call(self, observation, training=None):
        """The policy's raw output: `generate`d token ids (B, 256); `sample_actions` decodes them.

        During `fit` the loss is computed in `compute_loss`; there `call`
        only validates the batch and returns zeros (B,).
        """
        if training:
            obs = self._prepare(observation, for_loss=True, augment=False)
            return ops.zeros((ops.shape(obs["tokens"])[0],))
        return self.generate(observation)

    # === Inference ===

    def generate(self, observation, max_decoding_steps=256, temperature=0.0, return_logits=False):
        """Decodes tokens after the observation's tokens (openpi's `Pi0FAST.sample_actions`).

        The prefix (images and prompt) is right-aligned per example
        (`left_to_right_align`) and run once into a key/value cache
        preallocated to `prefill_size + max_decoding_steps` slots, with
        positions `cumsum(input_mask) - 1`. Token 0 is chosen from the last
        prefix logit; token s (s >= 1) comes from feeding token s - 1 at
        position `prefill_len + s` (one more than in training, as openpi),
        written to cache slot `prefill_size + s - 1` and attending to the
        slots `[prefill_size - prefill_len, prefill_size + s - 1]`
        (`decode_step_mask`). Decoding stops once every sequence has emitted
        `eos_token_id`; later slots, and a sequence's slots after its EOS,
        hold 0, and a finished sequence is fed 0. (openpi stops only when all
        sequences emit EOS at the same step and keeps whatever a finished
        sequence generates; every token up to a sequence's EOS is the same.)
        On JAX the whole decode is one compiled program (compiled once per
        input shape, `max_decoding_steps` and greedy/sampling).

        Args:
            observation: an observation dict; `token_ar_mask` defaults to zeros
                (a prefix-only prompt, as `FASTPromptTokenizer.tokenize`
                without actions gives).
            max_decoding_steps: the most tokens to decode.
            temperature: 0 for greedy (argmax), else sample from
                `softmax(logits / temperature)`.
            return_logits: also return the logits each token was chosen from.

        Returns:
            (B, max_decoding_steps) int32 token ids, and with `return_logits`
            also (B, max_decoding_steps, vocabulary_size) float32 logits
            (zeros after the stop).
        """
        steps = int(max_decoding_steps)
        if steps < 1:
            raise ValueError(f"'max_decoding_steps' must be at least 1, got {max_decoding_steps}.")
        temperature = float(temperature)
        if not temperature >= 0.0:
            raise ValueError(f"'temperature' must be >= 0, got {temperature}.")
        obs = self.prepare_observation(observation)
        sample = temperature > 0.0
        seed = self.seed_generator.next() if sample else ops.zeros((2,), "uint32")
        tokens, logits = self._generate_program(
            obs,
            ops.convert_to_tensor(max(temperature, 1e-6), "float32"),
            seed,
            steps=steps,
            sample=sample,
            return_logits=bool(return_logits),
        )
        return (tokens, logits) if return_logits else tokens

    def _generate(self, obs, temperature, seed, steps, sample, return_logits):
        embeddings, input_mask, ar_mask = self.embed_prefix(obs)
        attention = make_attention_mask(input_mask, ar_mask)
        embeddings, input_mask, attention = left_to_right_align(embeddings, input_mask, attention)
        batch, prefill_size = input_mask.shape
        cache_size = prefill_size + steps
        prefill_len = ops.sum(ops.cast(input_mask, "int32"), axis=1)
        prefix_start = prefill_size - prefill_len
        positions = ops.cumsum(ops.cast(input_mask, "int32"), axis=1) - 1
        attention = ops.pad(attention, ((0, 0), (0, 0), (0, steps)), constant_values=False)
        cache = self.gemma.init_kv_cache(batch, cache_size)
        (hidden,), cache = self.gemma(
            [embeddings], positions, attention, kv_cache=cache, cache_index=0
        )
        logits = self.gemma.decode_logits(hidden[:, -1:])[:, 0]

        def choose(logits, step):
            if sample:
                return sample_categorical(logits / temperature, step_seed(seed, step))
            return ops.cast(ops.argmax(logits, axis=-1), "int32")

        def record(step, token, logits, tokens, all_logits):
            tokens = ops.slice_update(tokens, (0, step), token[:, None])
            if return_logits:
                all_logits = ops.slice_update(all_logits, (0, step, 0), logits[:, None])
            return tokens, all_logits

        token = choose(logits, 0)
        tokens = ops.zeros((batch, steps), "int32")
        logits_shape = (batch, steps, self.vocabulary_size) if return_logits else (0,)
        all_logits = ops.zeros(logits_shape, "float32")
        tokens, all_logits = record(0, token, logits, tokens, all_logits)
        done = token == self.eos_token_id

        def keep_going(step, token, tokens, all_logits, done, cache):
            return ops.logical_and(step < steps, ops.logical_not(ops.all(done)))

        def decode(step, token, tokens, all_logits, done, cache):
            x = self.gemma.embed_tokens(token[:, None])
            mask = decode_step_mask(prefix_start, prefill_size + step, cache_size)
            (hidden,), cache = self.gemma(
                [x],
                prefill_len[:, None] + step,
                mask,
                kv_cache=cache,
                cache_index=prefill_size + step - 1,
            )
            logits = self.gemma.decode_logits(hidden)[:, 0]
            token = ops.where(done, 0, choose(logits, step))
            tokens, all_logits = record(step, token, logits, tokens, all_logits)
            done = ops.logical_or(done, token == self.eos_token_id)
            return step + 1, token, tokens, all_logits, done, cache

        _, _, tokens, all_logits, _, _ = ops.while_loop(
            keep_going,
            decode,
            (ops.convert_to_tensor(1, "int32"), token, tokens, all_logits, done, cache),
        )
        return tokens, all_logits if return_logits else None

    def sample_actions(self, observation, max_decoding_steps=256, temperature=0.0, strict=False):
        """Generates tokens and decodes each sequence into an action chunk (openpi's `ExtractFASTActions`).

        The carried tokenizer (`tokenizer`) decodes the text between
        `"Action: "` and `"|"` of each generated sequence; a sequence without a
        valid chunk gives zeros (and a logged warning), as in openpi, or with
        `strict` a `FASTDecodeError` (what a robot should get: no made-up
        actions). The decoding runs on the host (SentencePiece and BPE),
        after the compiled `generate`.

        Args:
            observation: an observation dict with a prefix-only prompt.
            max_decoding_steps: the most tokens to decode.
            temperature: 0 for greedy decoding.
            strict: raise for a sequence that holds no valid chunk instead
                of giving zeros.

        Returns:
            (B, action_horizon, action_dim) float32 tensor of normalized actions.

        Raises:
            ValueError: the model carries no tokenizer.
            FASTDecodeError: with `strict`, naming the first example whose
                tokens hold no valid chunk and why.
        """
        tokenizer = self.tokenizer.require_tokenizer()
        tokens = ops.convert_to_numpy(
            self.generate(
                observation, max_decoding_steps=max_decoding_steps, temperature=temperature
            )
        )
        chunks = []
        for index, row in enumerate(tokens):
            try:
                chunk = tokenizer.extract_actions(
                    row, self.action_horizon, self.action_dim, strict=strict
                )
            except FASTDecodeError as error:
                raise FASTDecodeError(
                    f"π0-FAST generated no valid action chunk for example {index} of "
                    f"{len(tokens)}: {error}"
                ) from None
            chunks.append(chunk)
        return ops.convert_to_tensor(np.stack(chunks).astype(np.float32))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "eos_token_id": self.eos_token_id,
                "tokenizer": keras.saving.serialize_keras_object(self.tokenizer),
            }
        )
        return config
