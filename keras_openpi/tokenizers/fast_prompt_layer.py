"""π0-FAST's tokenizer as a Keras layer, so that a `Pi0Fast` carries it through `.keras` files."""

import pathlib

import keras

from keras_openpi.tokenizers.fast_prompt import FAST_DIRECTORY
from keras_openpi.tokenizers.fast_prompt import SENTENCEPIECE_FILE
from keras_openpi.tokenizers.fast_prompt import FASTPromptTokenizer


@keras.saving.register_keras_serializable(package="keras_openpi")
class FASTPromptTokenizerLayer(keras.layers.Layer):
    """Holds a `FASTPromptTokenizer` (or none yet); its files are the layer's assets.

    A `.keras` file stores the tokenizer's files among its assets, as
    keras-hub's tokenizers do (`save_assets` / `load_assets`): the PaliGemma
    SentencePiece model (`paligemma_tokenizer.model`) and the FAST tokenizer
    (`fast/`, the released processor's format); `get_config` holds
    `max_len` and `skip_tokens`. A model saved without a tokenizer reloads
    without one. (`.weights.h5` files and checkpoints hold weights only.)
    In a keras-hub preset the same files are `assets/tokenizer/` and the
    config `tokenizer.json` (keras-hub's saver writes them; its loader calls
    `load_preset_assets`).

    Args:
        tokenizer: a `FASTPromptTokenizer`, or None.
        max_len: L, the token length (the model's `max_token_len`).
        skip_tokens: see `FASTPromptTokenizer`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> layer = FASTPromptTokenizerLayer(FASTPromptTokenizer("paligemma_tokenizer.model", "fast/"))  # doctest: +SKIP
    >>> layer.extract_actions(generated_ids, horizon=10, dim=7).shape  # doctest: +SKIP
    (10, 7)
    """

    def __init__(self, tokenizer=None, max_len=250, skip_tokens=128, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.max_len = int(max_len)
        self.skip_tokens = int(skip_tokens)
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self.built = True

    def set_tokenizer(self, tokenizer):
        """Holds `tokenizer`, a `FASTPromptTokenizer` with this layer's `max_len` and `skip_tokens`."""
        if not isinstance(tokenizer, FASTPromptTokenizer):
            raise ValueError(
                f"'tokenizer' must be a FASTPromptTokenizer, got {type(tokenizer).__name__}."
            )
        for name in ("max_len", "skip_tokens"):
            if getattr(tokenizer, name) != getattr(self, name):
                raise ValueError(
                    f"The tokenizer has {name}={getattr(tokenizer, name)}, the model "
                    f"expects {getattr(self, name)}."
                )
        self.tokenizer = tokenizer

    def require_tokenizer(self):
        """The held tokenizer; a clear error when there is none."""
        if self.tokenizer is None:
            raise ValueError(
                "This π0-FAST model carries no tokenizer: pass tokenizer=FASTPromptTokenizer(...) "
                "to Pi0Fast, or call model.set_tokenizer(...), before decoding actions."
            )
        return self.tokenizer

    def extract_actions(self, generated_ids, horizon, dim, strict=False):
        """`FASTPromptTokenizer.extract_actions` of the held tokenizer: an (H, D) chunk."""
        return self.require_tokenizer().extract_actions(generated_ids, horizon, dim, strict)

    def save_assets(self, dir_path):
        if self.tokenizer is not None:
            self.tokenizer.save(dir_path)

    def load_assets(self, dir_path):
        if (pathlib.Path(dir_path) / SENTENCEPIECE_FILE).is_file():
            self.tokenizer = FASTPromptTokenizer.load(dir_path, self.max_len, self.skip_tokens)

    # The files `load_assets` reads (`FASTPromptTokenizer.save` writes more).
    file_assets = (
        SENTENCEPIECE_FILE,
        f"{FAST_DIRECTORY}/processor_config.json",
        f"{FAST_DIRECTORY}/tokenizer.json",
    )

    def load_preset_assets(self, preset):
        """Reads the tokenizer from a keras-hub preset's `assets/tokenizer/`, as keras-hub's tokenizers do.

        Args:
            preset: a preset directory or keras-hub handle; remote files are
                downloaded (and cached) by keras-hub's resolver.

        Raises:
            FileNotFoundError: (keras-hub's) the preset lacks one of `file_assets`.
        """
        from keras_hub.src.utils.preset_utils import TOKENIZER_ASSET_DIR
        from keras_hub.src.utils.preset_utils import get_file

        paths = [get_file(preset, f"{TOKENIZER_ASSET_DIR}/{name}") for name in self.file_assets]
        self.load_assets(pathlib.Path(paths[0]).parent)

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len, "skip_tokens": self.skip_tokens}
