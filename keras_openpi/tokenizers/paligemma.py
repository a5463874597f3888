"""openpi's PaliGemma prompt tokenizer (SentencePiece), for π0 and π0.5 prompts."""

import pathlib

import numpy as np

from keras_openpi.tokenizers.prompt_tokenizer import PromptTokenizer


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
        path = pathlib.Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {path}: pass the PaliGemma tokenizer file "
                "(gs://big_vision/paligemma_tokenizer.model, or vocabulary.spm of a "
                "keras-hub PaliGemma preset)."
            )
        super().__init__(max_len)
        self.model_path = str(path)
        self._load(path.read_bytes())

    def _load(self, proto):
        import sentencepiece

        self._proto = proto
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=proto)

    # Picklable (data loader workers): the model travels as its bytes.
    def __getstate__(self):
        return {"model_path": self.model_path, "max_len": self.max_len, "proto": self._proto}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self.max_len = state["max_len"]
        self._load(state["proto"])

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
