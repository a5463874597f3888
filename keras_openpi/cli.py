"""`keras-openpi`: the command-line entry point; each subcommand lives in `keras_openpi.commands`.

Building the parser imports no Keras, JAX or TensorFlow: each command module
imports its heavy dependencies inside `run`, so `keras-openpi --help` is quick.
"""

import argparse
import contextlib
import importlib.abc
import importlib.util
import os
import sys

# Subcommand modules; each has `add_parser(subparsers)` and `run(args) -> int`
# and imports only light modules at its top.
COMMANDS = ["convert", "demo", "export", "export_policy", "norm_stats", "serve", "train"]
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


@contextlib.contextmanager
def _stderr_to_devnull():
    """Points file descriptor 2 at /dev/null (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietTensorFlowLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with file descriptor 2 pointed at /dev/null."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        with _stderr_to_devnull():
            self.loader.exec_module(module)
            # The first look for GPUs logs a CUDA error on machines without a driver.
            module.config.list_physical_devices("GPU")
            if os.environ.get("KERAS_BACKEND") != "tensorflow":
                module.config.set_visible_devices([], "GPU")  # JAX owns them (as in data/rlds.py)


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports `tensorflow` without its start-up lines (oneDNN, CUDA, absl).

    Keras imports TensorFlow whenever it is installed and a model is saved
    (`keras.saving` checks for `tf.TensorShape`), and the RLDS reader needs
    it. TensorFlow's C++ start-up lines go straight to file descriptor 2
    before `TF_CPP_MIN_LOG_LEVEL` applies, so the import runs with it pointed
    at /dev/null; unless TensorFlow is the Keras backend, its GPUs are hidden
    then too. Python errors of the import still raise as usual.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; the usual finders locate it
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietTensorFlowLoader(spec.loader)
        return spec


def quiet_tensorflow():
    """Makes this process's TensorFlow quiet: its import and its C++ INFO lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, QuietTensorFlowImport())


def main(argv=None):
    """Runs a subcommand; `argv=None` means this process is `keras-openpi` itself."""
    if argv is None:
        quiet_tensorflow()  # process-wide: only in our own process
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
