"""`Trainer`: a `TrainConfig` run end to end with `model.fit`, checkpoints, resume and export.

    trainer = Trainer(get_config("demo"), checkpoint_dir="runs/demo")
    result = trainer.run()          # prepare → build → fit → export

`prepare()` does every check that can fail before a model exists (devices
and batch size, checkpoint directory, weights and tokenizer files, dataset,
norm stats), so a wrong setting fails in seconds with a one-line reason.
"""

import contextlib
import dataclasses
import inspect
import json
import pathlib
import shutil
import warnings

import keras

from keras_openpi.convert.keras_file import load_keras_weights
from keras_openpi.convert.keras_file import read_keras_spec
from keras_openpi.data.loader import DataLoader
from keras_openpi.data.normalize import save_norm_stats
from keras_openpi.training import data as training_data
from keras_openpi.training.callbacks import CheckpointSaver
from keras_openpi.training.callbacks import MetricsLogger
from keras_openpi.training.checkpoints import ASSETS_DIR
from keras_openpi.training.checkpoints import MODEL_FILE
from keras_openpi.training.checkpoints import CheckpointManager
from keras_openpi.training.distribution import check_batch_size
from keras_openpi.training.distribution import make_distribution
from keras_openpi.training.distribution import training_devices
from keras_openpi.training.optimizer import make_optimizer

CONFIG_FILE = "train_config.json"
EXPORT_DIR = "export"
EXPORT_MODEL = "policy.keras"


def model_settings(config):
    """`Pi0` arguments of a config: `config.model` over `Pi0`'s defaults."""
    from keras_openpi.models.pi0 import Pi0

    defaults = {
        name: p.default
        for name, p in inspect.signature(Pi0.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    settings = {**defaults, **config.model}
    if settings["max_token_len"] is None:
        settings["max_token_len"] = 200 if settings["pi05"] else 48
    return settings


def make_tokenizer(config, settings):
    """The prompt tokenizer: `byte`, or the PaliGemma SentencePiece file `config.tokenizer`."""
    from keras_openpi.tokenizers import ByteTokenizer
    from keras_openpi.tokenizers import PaliGemmaTokenizer

    if config.tokenizer is None:
        raise ValueError(
            f"config {config.name!r} needs the PaliGemma tokenizer: --set "
            "tokenizer=PATH/paligemma_tokenizer.model (gs://big_vision/paligemma_tokenizer.model)."
        )
    if config.tokenizer == "byte":
        return ByteTokenizer(settings["max_token_len"])
    return PaliGemmaTokenizer(config.tokenizer, max_len=settings["max_token_len"])


@contextlib.contextmanager
def without_training_state(model):
    """Hides the optimizer and compile settings, e.g. to save a `.keras` file of the policy."""
    optimizer, compiled = model.optimizer, model.compiled
    model.optimizer, model.compiled = None, False
    try:
        yield model
    finally:
        model.optimizer, model.compiled = optimizer, compiled


class Trainer:
    """Runs a `TrainConfig`: data, model, `model.fit`, checkpoints, exact resume, export.

    Args:
        config: a `TrainConfig` (`keras_openpi.training.config`).
        checkpoint_dir: the run's directory (default `config.checkpoint_dir`).
        resume: continue from the latest checkpoint in `checkpoint_dir`
            (weights, optimizer and EMA state, noise generator, data position).
        overwrite: delete the checkpoints already in `checkpoint_dir`.
        max_steps: stop at this global step (default `config.num_train_steps`);
            the last step is always checkpointed, so `resume` continues.
        verbose: `fit`'s verbosity (1: a progress bar).
        log: where the run's report lines go (None: nowhere).

    Example:
    >>> trainer = Trainer(get_config("demo"), checkpoint_dir="/tmp/demo", max_steps=4)
    >>> result = trainer.run()  # doctest: +SKIP
    >>> result["step"]  # doctest: +SKIP
    4
    """

    def __init__(
        self,
        config,
        *,
        checkpoint_dir=None,
        resume=False,
        overwrite=False,
        max_steps=None,
        verbose=1,
        log=print,
    ):
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other.")
        if max_steps is not None and int(max_steps) < 1:
            raise ValueError(f"--max-steps must be at least 1, got {max_steps}.")
        self.config = config
        self.checkpoint_dir = pathlib.Path(checkpoint_dir or config.checkpoint_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.end_step = min(config.num_train_steps, int(max_steps or config.num_train_steps))
        self.verbose = verbose
        self.log = log or (lambda *_: None)
        self.manager = CheckpointManager(self.checkpoint_dir, config.keep_last, config.keep_period)
        self.model = None
        self.prepared = False

    # === Checks and data ===

    def prepare(self):
        """Checks everything that can be checked before building the model, and sets up the data."""
        config = self.config
        num_devices = len(training_devices())
        check_batch_size(config.batch_size, num_devices, config.fsdp_devices)
        self._check_checkpoint_dir()
        self.settings = model_settings(config)
        if self.resume_state is None and config.base_weights and not config.weights:
            raise ValueError(
                f"config {config.name!r} starts from {config.base_weights}: give their path with "
                "--set weights=PATH (nothing is downloaded)."
            )
        if config.weights and not pathlib.Path(config.weights).exists():
            raise FileNotFoundError(f"weights {config.weights} do not exist.")
        make_tokenizer(config, self.settings)  # fails now on a missing tokenizer file

        self.source = training_data.open_source(config, self.settings["action_horizon"])
        robot = training_data.robot_transforms(config)
        sample = training_data.first_sample(self.source, robot.inputs)
        architecture = self._architecture()
        self.settings.update({k: v for k, v in architecture.items() if k in self.settings})
        self.tokenizer = make_tokenizer(config, self.settings)
        if sample["actions"].shape[-1] > self.settings["action_dim"]:
            raise ValueError(
                f"the data's actions have {sample['actions'].shape[-1]} dims, more than the "
                f"model's action_dim {self.settings['action_dim']}."
            )
        stats_config = config
        self.asset_id = training_data.asset_id(config)
        if self.resume_state is not None:  # a resumed run normalizes with the stats it started with
            self.asset_id = self.resume_state["asset_id"]
            stats_dir = self.manager.step_dir(self.start_step) / ASSETS_DIR / self.asset_id
            stats_data = dataclasses.replace(config.data, norm_stats=str(stats_dir))
            stats_config = dataclasses.replace(config, data=stats_data)
        self.norm_stats, self.norm_stats_origin = training_data.resolve_norm_stats(
            stats_config, self.source, robot.inputs, sample, self.log
        )
        transforms = training_data.model_transforms(
            config, self.settings, self.tokenizer, self.norm_stats, robot
        )
        self.loader = DataLoader(
            self.source,
            config.batch_size,
            transform=transforms,
            seed=config.seed,
            shard=_process_shard(),
            workers=config.num_workers,
        )
        if self.resume_state is not None:
            self.loader.restore(self.resume_state["data"])
        self.prepared = True
        return self

    def _architecture(self):
        """The `Pi0` arguments fixed by the starting point: the checkpoint resumed, or the weights."""
        config = self.config
        if self.resume_state is not None:
            spec = json.loads((self.manager.step_dir(self.start_step) / MODEL_FILE).read_text())
            return spec["config"]
        if config.weights and config.weights.endswith(".keras"):
            return read_keras_spec(config.weights, expected_classes=("Pi0",))["config"]
        if config.weights:
            return self._openpi_params()[1]
        return {}

    def _check_checkpoint_dir(self):
        steps = self.manager.steps()
        self.resume_state, self.start_step = None, 0
        if steps and not (self.resume or self.overwrite):
            raise ValueError(
                f"{self.checkpoint_dir} already holds checkpoints (steps {steps}): pass --resume "
                "to continue that run or --overwrite to start over."
            )
        if self.resume and not steps:
            self.log(f"no checkpoint to resume in {self.checkpoint_dir}: starting a new run")
        if steps and self.resume:
            self.resume_state = self.manager.read_state()
            self.start_step = self.resume_state["step"]
            if self.start_step >= self.end_step:
                raise ValueError(
                    f"the run in {self.checkpoint_dir} is at step {self.start_step} already; raise "
                    f"num_train_steps / --max-steps above it (now {self.end_step})."
                )

    # === Model ===

    def _distribution(self):
        variables = None
        if self.config.fsdp_devices > 1:
            from keras_openpi.finetuning import shapes_only

            with shapes_only():
                variables = self._new_model(load_weights=False).variables
        return make_distribution(variables, self.config.fsdp_devices)

    def _openpi_params(self):
        """The openpi checkpoint of `config.weights` (read once) and its architecture."""
        if getattr(self, "_params", None) is None:
            from keras_openpi.convert import load_openpi_params
            from keras_openpi.convert import pi0_config_from_params

            params = load_openpi_params(self.config.weights)
            self._params = (params, pi0_config_from_params(params))
        return self._params

    def _new_model(self, load_weights=True):
        """The config's model with its strategy applied; the checkpoint's model when resuming."""
        from keras_openpi.models.pi0 import Pi0

        config = self.config
        if self.resume_state is not None:
            spec = json.loads((self.manager.step_dir(self.start_step) / MODEL_FILE).read_text())
            return keras.saving.deserialize_keras_object(spec)
        settings = dict(self.settings, seed=config.seed, augment=config.augment)
        if config.weights and config.weights.endswith(".keras"):
            spec = read_keras_spec(config.weights, expected_classes=("Pi0",))
            spec["config"].update(seed=config.seed, augment=config.augment)
            model = keras.saving.deserialize_keras_object(spec)
            if load_weights:
                load_keras_weights(model, config.weights, expected_classes=("Pi0",))
        elif config.weights:
            from keras_openpi.convert import load_pi0_weights

            params, architecture = self._openpi_params()
            if architecture["pi05"] != bool(config.model.get("pi05")):
                kinds = {True: "π0.5", False: "π0"}
                raise ValueError(
                    f"the weights {config.weights} are a {kinds[architecture['pi05']]} model; "
                    f"config {config.name!r} trains {kinds[bool(config.model.get('pi05'))]}."
                )
            model = Pi0(**settings)
            if load_weights:
                load_pi0_weights(model, params)
                self._params = None
        else:
            model = Pi0(**settings)
        model.apply_strategy(config.strategy)
        return model

    def build(self):
        """Builds the model under the distribution and compiles it (restoring it, to resume)."""
        if not self.prepared:
            self.prepare()
        config = self.config
        if self.overwrite and self.checkpoint_dir.exists():
            shutil.rmtree(self.checkpoint_dir)
        keras.utils.set_random_seed(config.seed)
        self.distribution = self._distribution()
        with self._scope():
            self.model = self._new_model()
            # XLA on JAX. TensorFlow trains as a graph (its XLA has no kernel for the
            # Beta draw of the flow-matching times), PyTorch eagerly (torch.compile
            # retraces Keras layers without end).
            jit_compile = keras.backend.backend() == "jax"
            self.model.compile(optimizer=make_optimizer(config), jit_compile=jit_compile)
            if self.resume_state is not None:
                self.model.optimizer.build(self.model.trainable_variables)
                self.manager.restore(self.model, self.start_step)
        self.log(str(self.model.trainable_summary()))
        return self.model

    def _scope(self):
        return (
            self.distribution.scope() if self.distribution is not None else contextlib.nullcontext()
        )

    # === Training ===

    def fit(self, callbacks=()):
        """Trains from the current step to the end step; returns the `History`."""
        if self.model is None:
            self.build()
        config = self.config
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (self.checkpoint_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
        steps = self.end_step - self.start_step
        what = f"resuming at step {self.start_step}" if self.start_step else "training"
        self.log(
            f"{what}: {steps} steps to step {self.end_step} of {config.num_train_steps}, batch "
            f"{config.batch_size}; norm stats: {self.norm_stats_origin}; "
            f"checkpoints: {self.checkpoint_dir}"
        )
        run_callbacks = [
            MetricsLogger(self.checkpoint_dir, tensorboard=config.tensorboard),
            CheckpointSaver(
                self.manager,
                config.save_interval,
                self.end_step,
                loader=self.loader,
                norm_stats=self.norm_stats,
                asset_id=self.asset_id,
                config=config,
            ),
            *callbacks,
        ]
        with self._scope(), warnings.catch_warnings():
            # The last VLM layer's feed-forward and final norm never reach the
            # action expert (as in openpi), so they get no gradient; Keras warns.
            warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
            history = self.model.fit(
                self.loader,
                epochs=1,
                steps_per_epoch=steps,
                shuffle=False,
                verbose=self.verbose,
                callbacks=run_callbacks,
            )
        self.start_step = self.end_step
        return history

    def export(self, directory=None):
        """Writes the policy (`policy.keras`, EMA weights when on) and its `norm_stats.json`.

        `keras-openpi serve DIR/policy.keras` serves it (the norm stats next to it are found).

        Returns:
            the `.keras` file's path.
        """
        directory = pathlib.Path(directory or self.checkpoint_dir / EXPORT_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / EXPORT_MODEL
        partial = directory / f".partial-{EXPORT_MODEL}"
        with without_training_state(self.model):
            self.model.save(partial)
        partial.replace(path)
        save_norm_stats(directory, self.norm_stats)
        self.log(f"exported {path} and its norm_stats.json")
        return path

    def run(self):
        """prepare → build → fit → export.

        Returns:
            dict with `step`, `history` (the `History`), `checkpoint_dir` and `export`
            (the `.keras` path).
        """
        self.prepare()
        self.build()
        history = self.fit()
        path = self.export()
        return {
            "step": self.end_step,
            "history": history,
            "checkpoint_dir": self.checkpoint_dir,
            "export": path,
        }


def train(config, **kwargs):
    """Runs `config` with a `Trainer` (taking its keyword arguments); returns `Trainer.run()`."""
    return Trainer(config, **kwargs).run()


def _process_shard():
    if keras.backend.backend() == "jax":
        import jax

        if jax.process_count() > 1:
            return (jax.process_index(), jax.process_count())
    return None
