"""`keras-openpi convert lerobot|openpi-pytorch SRC_DIR ...`: Hugging Face π0 / π0.5 checkpoints to a Keras model."""


def convert_lerobot(args):
    """Builds the `Pi0` of a `convert lerobot` / `convert openpi-pytorch` command line.

    Horizon, prompt length, cameras and π0 vs π0.5 come from the checkpoint's
    `config.json` and weights; `--action-horizon`, `--max-token-len` and
    `--model` override or check them.
    """
    from keras_openpi.convert import pi0_from_lerobot

    if args.model == "pi0_fast":
        raise ValueError(
            f"convert {args.source_format} reads π0 and π0.5 checkpoints; π0-FAST comes from openpi "
            "(convert openpi --model pi0_fast)."
        )
    if args.action_dim is not None:
        raise ValueError(f"--action-dim is for pi0_fast; a {args.source_format} checkpoint holds its action width.")
    if args.lora_scale != 1.0:
        raise ValueError(f"--lora-scale is for openpi checkpoints; a {args.source_format} checkpoint has no adapters.")
    return pi0_from_lerobot(
        args.source,
        layout=args.source_format,
        action_horizon=args.action_horizon,
        max_token_len=args.max_token_len,
        model=args.model,
    )
