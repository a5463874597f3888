"""`keras-openpi`: the command-line entry point; each subcommand lives in `keras_openpi.commands`."""

import argparse
import importlib
import sys

# Subcommand modules; each has `add_parser(subparsers)` and `run(args) -> int`.
COMMANDS = ["convert", "demo", "export", "norm_stats", "serve", "train"]
# Commands whose process trains: glibc keeps XLA's per-step buffers (see retain_freed_memory).
TRAINING_COMMANDS = ("demo", "train")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-openpi",
        description="openpi's π0 / π0.5 / π0-FAST policies as Keras 3 models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"keras_openpi.commands.{name}")
        module.add_parser(subparsers).set_defaults(run=module.run)
    return parser


def main(argv=None):
    """Runs a subcommand; `argv=None` means this process is `keras-openpi` itself."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in TRAINING_COMMANDS:
        from keras_openpi.backend import retain_freed_memory

        retain_freed_memory()  # a process-wide allocator setting: only in our own process
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"keras-openpi {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
