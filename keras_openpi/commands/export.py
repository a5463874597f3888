"""`keras-openpi export openpi|lerobot MODEL.keras --output DIR`: a Keras model back to openpi or LeRobot."""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "export",
        help="write a .keras model as an openpi params/ checkpoint or a LeRobot model.safetensors + config.json",
    )
    parser.add_argument("target_format", choices=["openpi", "lerobot"], help="checkpoint format to write")
    parser.add_argument(
        "model",
        help="a .keras file or a training checkpoint directory (LoRA adapters are merged into the "
        "written weights unless --keep-lora)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="a new directory: openpi -> DIR/params/ (orbax); lerobot -> DIR/model.safetensors, DIR/config.json",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the written weights"
    )
    parser.add_argument(
        "--keep-lora",
        action="store_true",
        help="openpi only: write openpi-form LoRA adapters unmerged as openpi's lora_a / lora_b weights",
    )
    return parser


def run(args):
    import os

    from keras_openpi.convert.lerobot_checkpoint import export_lerobot
    from keras_openpi.convert.openpi_export import export_openpi
    from keras_openpi.serving.checkpoint import checkpoint_format

    if os.path.exists(args.output):
        raise ValueError(f"--output {args.output!r} exists; choose a new directory.")
    if args.keep_lora and args.target_format != "openpi":
        raise ValueError("--keep-lora is for openpi exports; LeRobot's models have no LoRA weights.")
    model = checkpoint_format(args.model).load_model(args.model)
    try:
        if args.target_format == "openpi":
            export_openpi(model, args.output, dtype=args.dtype, keep_lora=args.keep_lora)
        else:
            export_lerobot(model, args.output, dtype=args.dtype)
    except FileExistsError as error:  # created meanwhile
        raise ValueError(str(error)) from None
    print(f"wrote {args.output} ({args.target_format}, {args.dtype})")
    if args.keep_lora:
        lora = ", ".join(
            f"{group} LoRAConfig(rank={spec['rank']}, alpha={spec['alpha']:g})"
            for group, spec in model.finetuning_state.lora.items()
        )
        print(f"LoRA kept unmerged; openpi restores it with {lora}")
    return 0
