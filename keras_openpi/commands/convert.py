"""`keras-openpi convert openpi SRC ...`: an openpi checkpoint to a `.keras` file."""

import os


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "convert", help="convert an openpi checkpoint into a .keras file"
    )
    parser.add_argument("source_format", choices=["openpi"], help="checkpoint format")
    parser.add_argument(
        "source",
        help="openpi params/ orbax directory or .npz of flat openpi parameter paths",
    )
    parser.add_argument("--model", choices=["pi0", "pi05"], required=True)
    parser.add_argument("--action-horizon", type=int, required=True)
    parser.add_argument("--max-token-len", type=int, default=None)
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=1.0,
        help="openpi LoRA alpha/rank for checkpoints with adapters (merged)",
    )
    parser.add_argument("--output", required=True, help="the .keras file to write")
    return parser


def run(args):
    from keras_openpi.convert import pi0_from_openpi

    if not args.output.endswith(".keras"):
        raise ValueError(f"--output must end in .keras, got {args.output!r}.")
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
