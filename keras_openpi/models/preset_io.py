"""keras-hub presets of the policies: `save_to_preset` and `from_preset`.

A preset is keras-hub's directory layout, written by keras-hub's own saver
and read by its own loader (`keras_hub.src.utils.preset_utils`), so local
directories, `hf://` and `kaggle://` handles work as for keras-hub's models
and `keras_hub.upload_preset(uri, preset_dir)` publishes one:

- `config.json`: the model's Keras config (class `keras_openpi>Pi0` or
  `keras_openpi>Pi0Fast`), with its fine-tuning record (LoRA adapters, ranks,
  alphas, frozen weights, int8 layers; see `keras_openpi.finetuning`);
- `model.weights.h5` (or, past `max_shard_size` GB, `model.weights.json` and
  its `model_*.weights.h5` shards): every weight, LoRA adapters unmerged;
- `metadata.json`: Keras and keras-hub versions, parameter count, date;
- `tokenizer.json` and `assets/tokenizer/`: π0-FAST's carried
  `FASTPromptTokenizerLayer`, or the prompt tokenizer given to a π0's
  `save_to_preset` (a keras-hub `PaliGemmaTokenizer`).

The policies are not keras-hub `Backbone`s (docs/architecture.md says why):
`keras_hub.models.Backbone.from_preset(dir)` refuses a policy preset with
keras-hub's own message, naming the class to call `from_preset` on.
keras-hub (and with it TensorFlow, when installed) is imported only when a
preset is written or read. A policy started from a keras-hub PaliGemma is
`Pi0.from_paligemma(preset)` / `Pi0Fast.from_paligemma(preset)`
(`models/paligemma_weights.py`).
"""

import json
import os
import pathlib
import shutil
import uuid

# keras-hub's preset file names (`keras_hub.src.utils.preset_utils`), repeated
# so that checking a directory does not import keras-hub. A directory holding
# anything else is not replaced by `save_to_preset`.
PRESET_FILES = (
    "config.json",
    "metadata.json",
    "model.weights.h5",
    "model.weights.json",
    "tokenizer.json",
    "task.json",
    "task.weights.h5",
    "preprocessor.json",
    "image_converter.json",
    "audio_converter.json",
    "video_converter.json",
    "README.md",
    "assets",
)
# Weight-file suffixes: an output path ending in one names a file, not a preset directory.
FILE_SUFFIXES = (".h5", ".npz", ".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".zip")


def _is_preset_entry(name):
    return name in PRESET_FILES or (name.startswith("model_") and name.endswith(".weights.h5"))


def check_preset_dir(preset_dir):
    """Raises a `ValueError` unless a preset can be written at `preset_dir`.

    It may be missing, an empty directory, or a directory holding only a
    preset's files (`PRESET_FILES`, weight shards); those are replaced.

    Args:
        preset_dir: the directory `save_to_preset` would write.
    """
    path = pathlib.Path(preset_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; a preset is a directory.")
    if path.is_dir():
        foreign = sorted(name for name in os.listdir(path) if not _is_preset_entry(name))
        if foreign:
            raise ValueError(
                f"{path} holds files that are not a preset's ({', '.join(foreign[:5])}); "
                "write the preset to a new or empty directory."
            )


def _replace_dir(staging, target):
    """Moves the complete directory `staging` to `target`, replacing a preset there."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _carried_tokenizer(model):
    """The tokenizer layer the model carries (π0-FAST's), or None."""
    from keras_openpi.tokenizers.fast_prompt_layer import FASTPromptTokenizerLayer

    layer = getattr(model, "tokenizer", None)
    return layer if isinstance(layer, FASTPromptTokenizerLayer) else None


def save_preset(model, preset_dir, tokenizer=None, max_shard_size=10):
    """Writes `model` (and a tokenizer) as a keras-hub preset; see `PresetMixin.save_to_preset`."""
    target = pathlib.Path(preset_dir).absolute()
    check_preset_dir(target)
    carried = _carried_tokenizer(model)
    if carried is not None and tokenizer is not None:
        raise ValueError(
            f"{type(model).__name__} carries its tokenizer (written with the preset); "
            "pass no 'tokenizer' (model.set_tokenizer(...) changes it)."
        )
    if tokenizer is not None and not hasattr(tokenizer, "save_to_preset"):
        raise ValueError(
            "'tokenizer' must be a PaliGemmaTokenizer (keras_openpi's or keras-hub's), got "
            f"{type(tokenizer).__name__}."
        )
    if carried is not None and carried.tokenizer is None:
        carried = None  # a model without a tokenizer yet: none is written
    from keras_hub.src.utils.preset_utils import get_preset_saver

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    os.mkdir(staging)
    try:
        saver = get_preset_saver(str(staging))
        saver.save_backbone(model, max_shard_size=max_shard_size)
        if carried is not None:
            saver.save_tokenizer(carried)
        elif tokenizer is not None:
            tokenizer.save_to_preset(str(staging))
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _local_or_handle(preset):
    """`preset` as a string; a clear error for a local path that is not a directory."""
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str):
        raise ValueError(
            "'preset' must be a preset directory or a keras-hub handle (hf://..., kaggle://...), "
            f"got {type(preset).__name__}."
        )
    if "://" in preset:
        return preset
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    if preset not in BUILTIN_PRESETS and not os.path.isdir(preset):
        what = "is a file, not" if os.path.exists(preset) else "does not exist; expected"
        raise FileNotFoundError(
            f"the preset {preset} {what} a preset directory (written by save_to_preset) "
            "or a keras-hub handle (hf://..., kaggle://...)."
        )
    return preset


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _damaged_file(preset, names):
    """The first of the preset's files `names` that is missing or does not parse, or None."""
    import h5py
    import sentencepiece
    from keras_hub.src.utils.preset_utils import get_file

    for name in names:
        try:
            path = get_file(preset, name)
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as file:
                    json.load(file)
            elif name.endswith(".h5"):
                h5py.File(path, "r").close()
            elif name.endswith((".model", ".spm")):
                sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception:  # noqa: BLE001 - any failure to read marks the file
            return name
    return None


def _reading(preset, names, action):
    """`action()`; an error while it reads the preset's files `names` becomes one line naming the file."""
    try:
        return action()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        name = _damaged_file(preset, names)
        where = f"its {name} is missing or damaged" if name else f"reading {', '.join(names)}"
        raise ValueError(
            f"cannot load the preset {preset}: {where} ({type(error).__name__}: {_first_line(error)})."
        ) from None


def _weight_files(preset, loader):
    """The preset's weight files: `model.weights.h5`, or the shard index and its shards."""
    from keras_hub.src.utils import preset_utils

    if preset_utils.check_file_exists(preset, preset_utils.MODEL_WEIGHTS_FILE):
        return [preset_utils.MODEL_WEIGHTS_FILE]
    index = preset_utils.SHARDED_MODEL_WEIGHTS_CONFIG_FILE
    if not preset_utils.check_file_exists(preset, index):
        raise ValueError(
            f"cannot load the preset {preset}: it has no {preset_utils.MODEL_WEIGHTS_FILE} "
            f"(nor {index} of weight shards); pass load_weights=False for fresh weights."
        )
    shards = _reading(preset, [index], lambda: loader._get_sharded_filenames(
        preset_utils.get_file(preset, index)))  # fmt: skip
    return [index, *shards]


def _check_finite(model, preset):
    """Raises a `ValueError` naming the first float weight that holds NaN or inf."""
    import keras

    for variable in model.weights:
        if keras.backend.is_float_dtype(variable.dtype) and not bool(
            keras.ops.convert_to_numpy(keras.ops.all(keras.ops.isfinite(variable.value)))
        ):
            raise ValueError(
                f"{preset}: weight '{variable.path}' holds NaN or inf; the preset is damaged."
            )


def load_preset(cls, preset, load_weights=True, **kwargs):
    """Loads a policy preset as an instance of `cls`; see `PresetMixin.from_preset`."""
    from keras_hub.src.utils import preset_utils

    preset = _local_or_handle(preset)
    config_file = preset_utils.CONFIG_FILE
    loader = _reading(preset, [config_file], lambda: preset_utils.get_preset_loader(preset))
    if not isinstance(loader, preset_utils.KerasPresetLoader):
        raise ValueError(
            f"the preset {preset} holds a {type(loader).__name__.removesuffix('PresetLoader')} "
            f"checkpoint, not a keras_openpi policy preset (written by {cls.__name__}.save_to_preset)."
        )
    found = _reading(preset, [config_file], loader.check_backbone_class)
    if not (isinstance(found, type) and issubclass(found, cls)):
        hint = ""
        if found.__name__ == "PaliGemmaBackbone":
            owner = "Pi0" if cls.__name__ == "PaliGemmaPolicy" else cls.__name__
            hint = f"; start a policy from it with {owner}.from_paligemma"
        raise ValueError(f"the preset {preset} holds a {found.__name__}, not a {cls.__name__}{hint}.")
    weight_files = _weight_files(preset, loader) if load_weights else []
    model = _reading(preset, [config_file], lambda: loader.load_backbone(found, False, **kwargs))
    if load_weights:
        preset_utils.jax_memory_cleanup(model)  # as keras-hub: no second copy while loading
        _reading(preset, weight_files, lambda: loader._load_backbone_weights(model))
        _check_finite(model, preset)
    carried = _carried_tokenizer(model)
    if carried is not None and preset_utils.check_file_exists(
        preset, preset_utils.TOKENIZER_CONFIG_FILE
    ):
        files = [preset_utils.TOKENIZER_CONFIG_FILE] + [
            f"{preset_utils.TOKENIZER_ASSET_DIR}/{name}" for name in carried.file_assets
        ]
        layer = _reading(preset, files, lambda: loader.load_tokenizer(type(carried)))
        if not isinstance(layer, type(carried)) or layer.tokenizer is None:
            raise ValueError(
                f"the preset {preset}'s {preset_utils.TOKENIZER_CONFIG_FILE} holds a "
                f"{type(layer).__name__} without files, not the {type(carried).__name__} "
                f"{found.__name__} carries."
            )
        model.set_tokenizer(layer.tokenizer)
    return model


class PresetMixin:
    """keras-hub presets for `PaliGemmaPolicy` models.

    Example:
    >>> model = Pi0.from_paligemma("pali_gemma_3b_224", action_dim=8)    # doctest: +SKIP
    >>> model.save_to_preset("pi0_robot", tokenizer=PaliGemmaTokenizer(...))  # doctest: +SKIP
    >>> keras_hub.upload_preset("hf://me/pi0_robot", "pi0_robot")         # doctest: +SKIP
    >>> model = Pi0.from_preset("hf://me/pi0_robot")                       # doctest: +SKIP
    """

    def save_to_preset(self, preset_dir, tokenizer=None, max_shard_size=10):
        """Writes the model as a keras-hub preset directory (see `keras_openpi.models.preset_io`).

        The preset is written completely in a sibling directory, then moved
        to `preset_dir`, replacing a preset there (stale files included);
        on an error nothing is written.

        Args:
            preset_dir: the directory: missing, empty, or an earlier preset.
            tokenizer: π0: the prompt tokenizer to ship with the model, a
                `keras_openpi.tokenizers.PaliGemmaTokenizer` or a
                `keras_hub.models.PaliGemmaTokenizer` (read back with
                `PaliGemmaTokenizer.from_preset(preset_dir, max_len=...)`).
                π0-FAST writes the tokenizer it carries and takes none.
            max_shard_size: keras-hub's: weights larger than this many GB
                are written as shards (full-size π0 in float32 is 13 GB).

        Raises:
            ValueError: `preset_dir` is a file or holds files that are not a
                preset's; a tokenizer given to π0-FAST, or one that is not a
                PaliGemma tokenizer.
        """
        save_preset(self, preset_dir, tokenizer, max_shard_size)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Loads a preset through keras-hub's loader (as `keras_hub.models.Backbone.from_preset`).

        The model is rebuilt from `config.json` with its fine-tuning (LoRA
        adapters, ranks, alphas, frozen flags, int8 layers), then its weights
        are read and checked finite; π0-FAST gets the tokenizer of the
        preset's `assets/tokenizer/`. As for keras-hub's models, the model is
        built in Keras' default dtype policy unless `dtype` is given.

        Args:
            preset: a local preset directory, or a keras-hub handle
                (`hf://user/name`, `kaggle://user/model/keras/variant`), which
                keras-hub downloads and caches.
            load_weights: False for the preset's architecture with fresh weights.
            **kwargs: `dtype` (e.g. `"mixed_bfloat16"`) and constructor
                arguments that replace the saved ones (e.g. `seed`, `augment`).

        Returns:
            the model: an instance of the preset's class, which must be `cls`
            or a subclass (`PaliGemmaPolicy.from_preset` loads any policy).

        Raises:
            FileNotFoundError: a local path that is not a directory.
            ValueError: a preset of another model (naming both classes); a
                missing or damaged file (`config.json`, the weights, the
                tokenizer's), named in one line; a NaN or inf weight (named).
        """
        return load_preset(cls, preset, load_weights, **kwargs)
