"""`keras-openpi convert openpi|lerobot|openpi-pytorch SRC ...`: a checkpoint to a `.keras` file."""

import os


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "convert", help="convert an openpi, LeRobot or openpi-PyTorch checkpoint into a .keras file"
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
        "--lora-scale",
        type=float,
        default=1.0,
        help="openpi LoRA alpha/rank for checkpoints with adapters (merged)",
    )
    parser.add_argument("--output", required=True, help="the .keras file to write")
    return parser


def run(args):
    from keras_openpi.convert import pi0_fast_from_openpi
    from keras_openpi.convert import pi0_from_openpi

    if not args.output.endswith(".keras"):
        raise ValueError(f"--output must end in .keras, got {args.output!r}.")
    if args.source_format != "openpi":
        from keras_openpi.commands.convert_lerobot import convert_lerobot

        model = convert_lerobot(args)
    elif args.model is None or args.action_horizon is None:
        raise ValueError("convert openpi needs --model and --action-horizon.")
    elif args.model == "pi0_fast":
        if args.action_dim is None:
            raise ValueError(
                "--model pi0_fast needs --action-dim (the width of the decoded action chunks; "
                "openpi's Pi0FASTConfig.action_dim, e.g. 8 for DROID, 7 for LIBERO)."
            )
        model = pi0_fast_from_openpi(
            args.source,
            action_dim=args.action_dim,
            action_horizon=args.action_horizon,
            max_token_len=args.max_token_len or 250,
            lora_scale=args.lora_scale,
        )
    else:
        if args.action_dim is not None:
            raise ValueError(
                f"--action-dim is for pi0_fast; a {args.model} checkpoint holds its action width."
            )
        model = pi0_from_openpi(
            args.source,
            action_horizon=args.action_horizon,
            max_token_len=args.max_token_len,
            model=args.model,
            lora_scale=args.lora_scale,
        )
    # Write next to the target and rename, so that a failure leaves nothing behind.
    partial = args.output + ".partial.keras"
    try:
        model.save(partial)
        os.replace(partial, args.output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    print(f"wrote {args.output} ({model.count_params():,} parameters)")
    return 0
