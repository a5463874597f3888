"""Where a tokenizer's files live in a keras-hub preset.

keras-hub writes a tokenizer as `tokenizer.json` (its Keras config) and its
vocabulary under `assets/tokenizer/` (`vocabulary.spm` for SentencePiece
tokenizers such as `keras_hub.models.PaliGemmaTokenizer`). These names are
keras-hub's (`keras_hub.src.utils.preset_utils`); they are repeated here so
that reading a local preset needs neither keras-hub nor TensorFlow.
"""

import os
import pathlib

TOKENIZER_CONFIG_FILE = "tokenizer.json"
TOKENIZER_ASSET_DIR = "assets/tokenizer"
SENTENCEPIECE_VOCABULARY_FILE = "vocabulary.spm"


def is_local_preset(preset):
    """Whether `preset` names a local directory (not `hf://`, `kaggle://` or a preset name)."""
    return isinstance(preset, os.PathLike) or (
        isinstance(preset, str) and "://" not in preset and os.path.isdir(preset)
    )


def preset_file(preset, path):
    """The local path of the file `path` of `preset`, downloaded first if `preset` is remote.

    Args:
        preset: a local preset directory, or a keras-hub handle (`hf://...`,
            `kaggle://...`, a keras-hub preset name); remote handles go
            through keras-hub's own resolver, which caches downloads.
        path: the file's path inside the preset, e.g.
            `assets/tokenizer/vocabulary.spm`.

    Raises:
        FileNotFoundError: the preset has no such file.
    """
    if is_local_preset(preset):
        local = pathlib.Path(preset) / path
        if not local.is_file():
            raise FileNotFoundError(
                f"the preset {os.fspath(preset)} has no {path}: a keras-hub tokenizer preset "
                f"holds {TOKENIZER_CONFIG_FILE} and its vocabulary under {TOKENIZER_ASSET_DIR}/ "
                "(written by `save_to_preset`)."
            )
        return str(local)
    if not isinstance(preset, str):
        raise ValueError(
            f"'preset' must be a directory or a keras-hub handle (str), got "
            f"{type(preset).__name__}."
        )
    # keras-hub's preset file resolver (the one its loaders use); it has no
    # public name in keras-hub 0.32.
    from keras_hub.src.utils.preset_utils import get_file

    return get_file(preset, path)
