"""A SentencePiece model read from a local file, picklable for data-loader workers."""

import pathlib


class SentencePieceModel:
    """Loads a SentencePiece `.model` file; `processor` is its `SentencePieceProcessor`.

    Pickles as the model's bytes, so tokenizers holding one can cross process
    boundaries (data-loader workers). Nothing is downloaded: the file is local.

    Args:
        path: the `.model` file (PaliGemma's: `paligemma_tokenizer.model`).
    """

    def __init__(self, path):
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {path}: pass the PaliGemma tokenizer file "
                "(gs://big_vision/paligemma_tokenizer.model, or vocabulary.spm of a "
                "keras-hub PaliGemma preset)."
            )
        self.path = str(path)
        self._proto = path.read_bytes()
        self._load()

    @property
    def proto(self):
        """The serialized model (the bytes of the `.model` file)."""
        return self._proto

    def _load(self):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self._proto)

    def save(self, path):
        """Writes the model's bytes to `path` (a `.model` file)."""
        pathlib.Path(path).write_bytes(self._proto)

    def __getstate__(self):
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state):
        self.path, self._proto = state["path"], state["proto"]
        self._load()
