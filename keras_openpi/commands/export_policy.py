"""`keras-openpi export-policy RUN_DIR`: (re)write a run's served-ready export from a checkpoint."""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "export-policy",
        help="export a training run's newest complete checkpoint as policy.keras + norm_stats.json",
        description=(
            "Writes RUN_DIR/export/policy.keras (EMA weights when the run has them, no optimizer "
            "state), its norm_stats.json and a manifest from the newest complete checkpoint, "
            "atomically: an interrupted export leaves the previous one or none. Redoes an export "
            "a crash or a full disk interrupted."
        ),
    )
    parser.add_argument("run_dir", help="the run's checkpoint directory (or one step directory)")
    parser.add_argument(
        "--step", type=int, help="export this step (default: the newest complete checkpoint)"
    )
    parser.add_argument("--output", help="the export folder (default RUN_DIR/export)")
    parser.add_argument(
        "--raw-weights",
        action="store_true",
        help="export the trained weights instead of their EMA (when the run kept one)",
    )
    return parser


def run(args):
    import sys
    import warnings

    from keras_openpi.checkpoint_format import CheckpointFallbackWarning
    from keras_openpi.training.errors import CheckpointWriteError
    from keras_openpi.training.errors import TrainingStopped
    from keras_openpi.training.export import export_checkpoint

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointFallbackWarning)
            path, step, has_stats = export_checkpoint(
                args.run_dir, step=args.step, output=args.output, use_ema=not args.raw_weights
            )
    except (TrainingStopped, CheckpointWriteError) as error:
        print(f"keras-openpi export-policy: error: {error}", file=sys.stderr)
        return 1
    for warning in caught:
        if issubclass(warning.category, CheckpointFallbackWarning):  # newer ones skipped
            print(f"keras-openpi export-policy: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    stats = "and its norm_stats.json" if has_stats else "(the checkpoint has no norm stats)"
    print(f"exported checkpoint {step} to {path} {stats}")
    print(f"serve it: keras-openpi serve {path}")
    return 0
