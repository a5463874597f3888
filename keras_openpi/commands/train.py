"""`keras-openpi train --config NAME`: fine-tune a policy from a registered training config."""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train a policy from a config (openpi's configs: pi0_libero, pi0_aloha_sim, ...)",
        description=(
            "Trains with model.fit from a registered config: openpi's AdamW, warm-up + cosine "
            "schedule and EMA, checkpoints every save_interval steps (exact --resume), "
            "metrics.csv and TensorBoard logs, and a served-ready export at the end."
        ),
    )
    parser.add_argument("--config", help="the config's name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the configs and exit")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting, e.g. data.path=/data/libero, batch_size=8, "
        "optimizer.peak_lr=1e-4, weights=PATH, strategy=lora (repeatable; values are JSON)",
    )
    parser.add_argument(
        "--max-steps", type=int, help="stop at this step (default: the config's num_train_steps)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        help="the run's directory (default <checkpoint_base_dir>/<config>/<exp_name>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the checkpoint directory from its newest complete checkpoint "
        "(a finished run whose export is missing is exported again)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the previous run's checkpoints, metrics, logs and export first (a directory "
        "holding other files is refused)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    hosts = parser.add_argument_group(
        "several processes",
        "Run the same command once per host (or per GPU), each with its --process-id; the "
        "processes form one mesh (JAX's multi-controller runtime, through "
        "keras.distribution.initialize). Under SLURM (srun), Open MPI (mpirun) or with "
        "KERAS_DISTRIBUTION_* set, JAX and Keras read them from the environment and no flag "
        "is needed. See docs/training.md.",
    )
    hosts.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address and a free port, the same on every process",
    )
    hosts.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="how many processes take part (1: a single process even under srun/mpirun)",
    )
    hosts.add_argument(
        "--process-id", type=int, metavar="I", help="this process's index, 0 ... N-1"
    )
    return parser


def list_configs():
    """The `--list` text: one line per config."""
    from keras_openpi.training.config import CONFIGS

    width = max(len(name) for name in CONFIGS)
    return "\n".join(f"{name:<{width}}  {config.description}" for name, config in CONFIGS.items())


def run(args):
    import json
    import sys

    from keras_openpi.training.config import apply_overrides
    from keras_openpi.training.config import get_config
    from keras_openpi.training.errors import CheckpointWriteError
    from keras_openpi.training.errors import TrainingStopped
    from keras_openpi.training.trainer import Trainer

    if args.list:
        print(list_configs())
        return 0
    if not args.config:
        raise ValueError(
            "give a config with --config NAME (`keras-openpi train --list` lists them)."
        )
    config = apply_overrides(get_config(args.config), args.set)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1, ensure_ascii=False))
        return 0
    from keras_openpi.backend.multiprocess import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
    trainer = Trainer(
        config,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        max_steps=args.max_steps,
    )
    try:
        result = trainer.run()
    except (TrainingStopped, CheckpointWriteError) as error:
        print(flush=True)  # end the progress bar's line
        print(f"keras-openpi train: error: {error}", file=sys.stderr)
        return 1
    if result["history"] is None:
        print(f"exported the finished run's step {result['step']} to {result['export']}")
    else:
        print(f"trained to step {result['step']}; checkpoints in {result['checkpoint_dir']}")
    if result["skipped_steps"]:
        print(
            f"{result['skipped_steps']} steps had a non-finite loss or gradient norm and were "
            "skipped (on_nonfinite=skip)"
        )
    print(f"serve it: keras-openpi serve {result['export']}")
    return 0
