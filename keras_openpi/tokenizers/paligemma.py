"""openpi's PaliGemma prompt tokenizer (SentencePiece), for π0 and π0.5 prompts."""

import numpy as np

from keras_openpi.tokenizers.preset import SENTENCEPIECE_VOCABULARY_FILE
from keras_openpi.tokenizers.preset import TOKENIZER_ASSET_DIR
from keras_openpi.tokenizers.preset import preset_file
from keras_openpi.tokenizers.prompt_tokenizer import PromptTokenizer
from keras_openpi.tokenizers.sentencepiece_model import SentencePieceModel


class PaliGemmaTokenizer(PromptTokenizer):
    """Tokenizes prompts as openpi's `PaligemmaTokenizer` does (layout: `PromptTokenizer`).

    The SentencePiece model is PaliGemma's (`paligemma_tokenizer.model`, the
    file openpi downloads from `gs://big_vision/paligemma_tokenizer.model`;
    keras-hub's PaliGemma presets ship the same model as
    `assets/tokenizer/vocabulary.spm`). Nothing is downloaded: pass the local
    file, or a preset with `from_preset`.

    Its ids are those of `keras_hub.models.PaliGemmaTokenizer` on the same
    vocabulary (keras-hub's tokenizer calls the same SentencePiece encoder),
    laid out as openpi does. It is not itself a keras-hub layer, for cost
    (measured by `benchmarks/tokenizer_keras_hub.py` on a 257,152-piece
    vocabulary): importing keras-hub imports Keras, and TensorFlow with
    TensorFlow Text whenever they are installed (~21 s and ~870 MB in a
    fresh process, against 0.04 s and ~56 MB for SentencePiece), in every
    server and data-loader worker that tokenizes; construction builds a
    Python vocabulary and a TensorFlow op (~5x slower); each prompt encodes
    ~13x slower. And its `tokenize(text)` returns raw ids, where openpi's
    returns padded ids and a mask. `to_keras_hub` gives the keras-hub layer
    on the same vocabulary, and presets are keras-hub's own: `save_to_preset`
    writes a `keras_hub.models.PaliGemmaTokenizer` preset, `from_preset`
    reads any keras-hub PaliGemma preset.

    Args:
        model_path: path of the SentencePiece `.model` file.
        max_len: the token length L (the model's `max_token_len`: openpi's
            π0 uses 48, π0.5 200).

    Example:
    >>> tokenizer = PaliGemmaTokenizer("paligemma_tokenizer.model", max_len=48)  # doctest: +SKIP
    >>> ids, mask = tokenizer.tokenize("pick up the cup")  # doctest: +SKIP
    >>> tokenizer.save_to_preset("preset/")  # doctest: +SKIP
    >>> tokenizer = PaliGemmaTokenizer.from_preset("preset/", max_len=48)  # doctest: +SKIP
    """

    def __init__(self, model_path, max_len=48):
        self._sentencepiece = SentencePieceModel(model_path)
        super().__init__(max_len)
        self.model_path = self._sentencepiece.path

    @property
    def _processor(self):
        return self._sentencepiece.processor

    @property
    def vocabulary_size(self):
        return self._processor.vocab_size()

    def _encode(self, text, add_bos=False):
        """SentencePiece ids of `text` (a list of ints), without cleaning or padding."""
        return self._processor.encode(text, add_bos=add_bos)

    def decode(self, ids):
        """Text of `ids`; padding (0) and ids past the vocabulary are dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 < int(i) < self.vocabulary_size]
        return self._processor.decode(ids)

    # === keras-hub ===

    def to_keras_hub(self, **kwargs):
        """The `keras_hub.models.PaliGemmaTokenizer` layer on this vocabulary.

        Its `tokenize(text)` gives the raw SentencePiece ids (no BOS, no
        cleaning, no padding) that `tokenize` lays out.

        Args:
            **kwargs: more `keras_hub.models.PaliGemmaTokenizer` arguments
                (e.g. `sequence_length`, `add_bos`).

        Raises:
            ValueError: (keras-hub's) the vocabulary lacks PaliGemma's
                `<bos>`, `<eos>` or `<pad>` piece.
        """
        import keras_hub

        return keras_hub.models.PaliGemmaTokenizer(proto=self._sentencepiece.proto, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes the vocabulary as keras-hub's `PaliGemmaTokenizer` does.

        `preset_dir/tokenizer.json` (the keras-hub layer's config) and
        `preset_dir/assets/tokenizer/vocabulary.spm` (the SentencePiece
        model, byte for byte), so that keras-hub's loaders read it back as a
        `keras_hub.models.PaliGemmaTokenizer`. `max_len` is not written: it is
        the model's `max_token_len`.

        Args:
            preset_dir: the preset directory (created if missing).
        """
        self.to_keras_hub().save_to_preset(str(preset_dir))

    @classmethod
    def from_preset(cls, preset, max_len=48):
        """Reads the vocabulary of a keras-hub preset's PaliGemma tokenizer.

        Args:
            preset: a local preset directory, or a keras-hub handle (`hf://`,
                `kaggle://`, a keras-hub preset name such as
                `pali_gemma_3b_224`; these download through keras-hub).
            max_len: the token length L (the model's `max_token_len`).

        Raises:
            FileNotFoundError: the preset has no `assets/tokenizer/vocabulary.spm`.
        """
        path = preset_file(preset, f"{TOKENIZER_ASSET_DIR}/{SENTENCEPIECE_VOCABULARY_FILE}")
        return cls(path, max_len=max_len)
