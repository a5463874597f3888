"""openpi's PaliGemma prompt tokenizer (SentencePiece), for π0 and π0.5 prompts."""

import numpy as np

from keras_openpi.tokenizers.prompt_tokenizer import PromptTokenizer
from keras_openpi.tokenizers.sentencepiece_model import SentencePieceModel


class PaligemmaTokenizer(PromptTokenizer):
    """Tokenizes prompts as openpi's `PaligemmaTokenizer` does (layout: `PromptTokenizer`).

    The SentencePiece model is PaliGemma's (`paligemma_tokenizer.model`, the
    file openpi downloads from `gs://big_vision/paligemma_tokenizer.model`;
    keras-hub's PaliGemma presets ship the same model as `vocabulary.spm`).
    Nothing is downloaded: pass the local file.

    Args:
        model_path: path of the SentencePiece `.model` file.
        max_len: the token length L (the model's `max_token_len`: openpi's
            π0 uses 48, π0.5 200).

    Example:
    >>> tokenizer = PaligemmaTokenizer("paligemma_tokenizer.model", max_len=48)  # doctest: +SKIP
    >>> ids, mask = tokenizer.tokenize("pick up the cup")  # doctest: +SKIP
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
