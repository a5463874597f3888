"""`keras-openpi convert openpi|lerobot|openpi-pytorch SRC ...`: a checkpoint to a `.keras` file or a preset.

`--output` ending in `.keras` is a `.keras` file; any other path is a
keras-hub preset directory (`model.save_to_preset`), except a path ending in
a weight-file suffix (`.h5`, `.npz`, ...), which is refused as ambiguous.
"""

import os
import tempfile


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert an openpi, LeRobot or openpi-PyTorch checkpoint into a .keras file or "
        "a keras-hub preset directory",
    )
    parser.add_argument(
        "source_format", choices=["openpi", "lerobot", "openpi-pytorch"], help="checkpoint format"
    )
    parser.add_argument(
        "source",
        help="openpi params/ orbax directory or .npz of flat openpi parameter paths; "
        "lerobot / openpi-pytorch: a directory with model.safetensors and config.json",
    )
    parser.add_argument(
        "--model",
        choices=["pi0", "pi05", "pi0_fast"],
        help="required for openpi; lerobot / openpi-pytorch: checked against the weights",
    )
    parser.add_argument(
        "--action-horizon",
        type=int,
        help="required for openpi; lerobot / openpi-pytorch: default from config.json",
    )
    parser.add_argument(
        "--action-dim",
        type=int,
        default=None,
        help="pi0_fast only (required there): width of the decoded action chunks",
    )
    parser.add_argument(
        "--max-token-len",
        type=int,
        default=None,
        help="token length (default: 48 pi0, 200 pi05, 250 pi0_fast)",
    )
    parser.add_argument(
        "--paligemma-tokenizer",
        metavar="PATH",
        help=(
            "pi0_fast: PaliGemma's SentencePiece paligemma_tokenizer.model (local); with "
            "--fast-tokenizer the model carries both and `keras-openpi serve` decodes its actions"
        ),
    )
    parser.add_argument(
        "--fast-tokenizer",
        metavar="DIR",
        help="pi0_fast: the FAST action tokenizer, a local copy of physical-intelligence/fast",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=1.0,
        help="openpi LoRA alpha/rank for checkpoints with adapters (merged)",
    )
    parser.add_argument(
        "--keep-lora",
        action="store_true",
        help="openpi only: keep the checkpoint's LoRA adapters unmerged, in openpi's form "
        "(trainable, frozen as openpi's *_lora configs), to continue a LoRA run",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="the .keras file to write, or (any path not ending in .keras) the keras-hub preset "
        "directory (config.json, model.weights.h5, metadata.json; loads with "
        "Pi0.from_preset(DIR))",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output file or preset directory",
    )
    return parser


def _existing_ancestor(path):
    """The nearest directory above `path` that exists (`path`'s parent when it exists)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def is_preset_output(output):
    """Whether `--output` names a keras-hub preset directory (not a `.keras` file)."""
    return not os.fspath(output).endswith(".keras")


def check_output(output, overwrite=False):
    """Raises a `ValueError` unless `output` can be written, before anything is converted.

    A `.keras` output must not exist (unless `overwrite`) nor be a
    directory. Any other output is a preset directory: it must not end in
    a weight-file suffix (`.h5`, `.npz`, ...), and an existing non-empty
    directory is replaced only with `overwrite` and only when it holds
    nothing but a preset's files. Either way the nearest existing folder
    must take a new file (probed by creating and removing one, which also
    catches read-only file systems where permission bits say nothing).
    """
    from keras_openpi.models.preset_io import FILE_SUFFIXES
    from keras_openpi.models.preset_io import check_preset_dir

    if is_preset_output(output):
        if output.endswith(FILE_SUFFIXES):
            raise ValueError(
                f"--output must be a .keras file or a preset directory, got {output!r} "
                "(a weight-file suffix)."
            )
        if os.path.isdir(output) and os.listdir(output) and not overwrite:
            raise ValueError(
                f"--output {output} is a directory that is not empty; pass --overwrite to "
                "replace the preset there (it is replaced only once the new one is complete)."
            )
        try:
            check_preset_dir(output)
        except ValueError as error:
            raise ValueError(f"--output {error}") from None
    else:
        if os.path.isdir(output):
            raise ValueError(f"--output {output} is a directory; give the .keras file to write.")
        if os.path.lexists(output) and not overwrite:
            raise ValueError(
                f"--output {output} exists already; pass --overwrite to replace it "
                "(it is replaced only once the new file is complete)."
            )
    folder = _existing_ancestor(output)
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write --output {output}: {folder} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".keras-openpi-write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write --output {output}: {folder} does not take new files "
            f"({error.strerror or error})."
        ) from None


def save_model(model, output):
    """Writes `model` to `output` (a `.keras` file or a preset), creating missing folders.

    A `.keras` file is written as a partial file, then renamed; a preset in a
    sibling directory, then moved (`save_to_preset`). A failure (a full
    disk, a kill) leaves no partial output and no folder this created.
    """
    created, folder = [], os.path.dirname(os.path.abspath(output))
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    partial = output + ".partial.keras"
    try:
        for folder in reversed(created):
            os.mkdir(folder)
        if is_preset_output(output):
            model.save_to_preset(output)
        else:
            model.save(partial)
            os.replace(partial, output)
    except OSError as error:
        raise ValueError(
            f"cannot write --output {output}: {error.strerror or error}; nothing was written."
        ) from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
        if not os.path.exists(output):
            for folder in created:
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)


def run(args):
    from keras_openpi.convert import check_settings

    check_settings(flags=True, lora_scale=args.lora_scale, max_token_len=args.max_token_len)
    if args.action_horizon is not None:
        check_settings(flags=True, action_horizon=args.action_horizon)
    if args.source_format == "openpi":
        model = _convert_openpi(args)
    elif args.keep_lora:
        raise ValueError(
            f"--keep-lora is for openpi checkpoints; a {args.source_format} checkpoint has no adapters."
        )
    else:
        from keras_openpi.commands.convert_lerobot import convert_lerobot

        check_output(args.output, args.overwrite)
        model = convert_lerobot(args)
    save_model(model, args.output)
    kind = "keras-hub preset, " if is_preset_output(args.output) else ""
    print(f"wrote {args.output} ({kind}{model.count_params():,} parameters)")
    return 0


def _convert_openpi(args):
    from keras_openpi.convert import check_settings
    from keras_openpi.convert import pi0_fast_from_openpi
    from keras_openpi.convert import pi0_from_openpi

    if args.model is None or args.action_horizon is None:
        raise ValueError("convert openpi needs --model and --action-horizon.")
    tokenizer = None
    if args.model == "pi0_fast":
        if args.action_dim is None:
            raise ValueError(
                "--model pi0_fast needs --action-dim (the width of the decoded action chunks; "
                "openpi's Pi0FASTConfig.action_dim, e.g. 8 for DROID, 7 for LIBERO)."
            )
        check_settings(flags=True, action_dim=args.action_dim)
        tokenizer = _fast_tokenizer(args)
    else:
        if args.action_dim is not None:
            raise ValueError(
                f"--action-dim is for pi0_fast; a {args.model} checkpoint holds its action width."
            )
        for flag in ("paligemma_tokenizer", "fast_tokenizer"):
            if getattr(args, flag) is not None:
                raise ValueError(
                    f"--{flag.replace('_', '-')} is for pi0_fast, whose model carries its "
                    f"tokenizer; a {args.model} model takes its prompt tokenizer when served "
                    "(keras-openpi serve --tokenizer)."
                )
    check_output(args.output, args.overwrite)
    # None: the model's default (48 pi0, 200 pi05, 250 pi0_fast); 0 was refused above.
    tokens = {} if args.max_token_len is None else {"max_token_len": args.max_token_len}
    if args.model == "pi0_fast":
        model = pi0_fast_from_openpi(
            args.source,
            action_dim=args.action_dim,
            action_horizon=args.action_horizon,
            lora_scale=args.lora_scale,
            keep_lora=args.keep_lora,
            **tokens,
        )
        return _carrying(model, tokenizer, args)
    return pi0_from_openpi(
        args.source,
        action_horizon=args.action_horizon,
        model=args.model,
        lora_scale=args.lora_scale,
        keep_lora=args.keep_lora,
        **tokens,
    )


def _carrying(model, tokenizer, args):
    """The π0-FAST `model` carrying `tokenizer` (with the model's `max_len`); as it is if None."""
    from keras_openpi.tokenizers import FASTPromptTokenizer

    if tokenizer is None:
        print(
            "note: the model carries no tokenizer (give --paligemma-tokenizer and "
            "--fast-tokenizer to serve it as it is)"
        )
        return model
    if tokenizer.vocabulary_size > model.vocabulary_size:
        raise ValueError(
            f"--paligemma-tokenizer {args.paligemma_tokenizer} has {tokenizer.vocabulary_size:,} "
            f"ids but the checkpoint's vocabulary has {model.vocabulary_size:,}; nothing was "
            "written."
        )
    model.set_tokenizer(
        FASTPromptTokenizer(
            tokenizer.model_path, tokenizer.fast_tokenizer, max_len=model.max_token_len
        )
    )
    return model


def _fast_tokenizer(args):
    """π0-FAST's `FASTPromptTokenizer` of `--paligemma-tokenizer` and `--fast-tokenizer`, or None.

    Read before the checkpoint, so that a wrong file fails at once (its
    `max_len` is set to the model's when the model is built).
    """
    from keras_openpi.tokenizers import FASTPromptTokenizer

    given = {
        "--paligemma-tokenizer": args.paligemma_tokenizer,
        "--fast-tokenizer": args.fast_tokenizer,
    }
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == 2:
        return None
    if missing:
        raise ValueError(
            f"{missing[0]} is needed too: π0-FAST's tokenizer is PaliGemma's SentencePiece model "
            "(--paligemma-tokenizer) and the FAST action tokenizer (--fast-tokenizer)."
        )
    if not os.path.isfile(args.paligemma_tokenizer):
        raise FileNotFoundError(f"--paligemma-tokenizer {args.paligemma_tokenizer} is not a file.")
    if not os.path.isdir(args.fast_tokenizer):
        raise FileNotFoundError(
            f"--fast-tokenizer {args.fast_tokenizer} is not a directory (a local copy of "
            "physical-intelligence/fast)."
        )
    return FASTPromptTokenizer(args.paligemma_tokenizer, args.fast_tokenizer)
