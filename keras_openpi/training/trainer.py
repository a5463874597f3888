"""`Trainer`: a `TrainConfig` run end to end with `model.fit`, checkpoints, resume and export.

    trainer = Trainer(get_config("demo"), checkpoint_dir="runs/demo")
    result = trainer.run()          # prepare → build → fit → export

`prepare()` does every check that can fail before a model exists (devices
and batch size, checkpoint directory, weights and tokenizer files, dataset,
norm stats), so a wrong setting fails in seconds with a one-line reason.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import warnings

import keras

from keras_openpi.backend.multiprocess import process_count
from keras_openpi.backend.multiprocess import process_index
from keras_openpi.backend.multiprocess import sync
from keras_openpi.checkpoint_format import ASSETS_DIR
from keras_openpi.checkpoint_format import MODEL_FILE
from keras_openpi.checkpoint_format import CheckpointError
from keras_openpi.checkpoint_format import load_model_spec
from keras_openpi.checkpoint_format import read_json
from keras_openpi.checkpoint_format import read_state
from keras_openpi.checkpoint_format import step_dirs
from keras_openpi.convert.keras_file import load_keras_weights
from keras_openpi.convert.keras_file import read_keras_spec
from keras_openpi.data.loader import DataLoader
from keras_openpi.training import data as training_data
from keras_openpi.training.callbacks import CheckpointSaver
from keras_openpi.training.callbacks import MetricsLogger
from keras_openpi.training.callbacks import NonFiniteGuard
from keras_openpi.training.checkpoints import CheckpointManager
from keras_openpi.training.distribution import check_batch_size
from keras_openpi.training.distribution import data_shard
from keras_openpi.training.distribution import make_distribution
from keras_openpi.training.distribution import training_devices
from keras_openpi.training.export import export_checkpoint
from keras_openpi.training.export import export_policy
from keras_openpi.training.export import export_step
from keras_openpi.training.optimizer import make_optimizer
from keras_openpi.training.resume import check_resume_settings
from keras_openpi.training.resume import agree_on_checkpoint
from keras_openpi.training.run_dir import CONFIG_FILE
from keras_openpi.training.run_dir import EXPORT_DIR
from keras_openpi.training.run_dir import EXPORT_MODEL
from keras_openpi.training.run_dir import check_overwritable
from keras_openpi.training.run_dir import move_aside
from keras_openpi.training.run_dir import remove_run_entries
from keras_openpi.training.run_dir import run_entries


def model_class(model_type):
    """The class of openpi's `model_type`: `Pi0` (`pi0`, `pi05`) or `Pi0Fast` (`pi0_fast`)."""
    from keras_openpi.models import Pi0
    from keras_openpi.models import Pi0Fast

    return Pi0Fast if model_type == "pi0_fast" else Pi0


def model_settings(config, architecture=None):
    """The run's model settings: the `get_config()` of the config's model, built without weights.

    The model is `config.model` (with `pi05` from `config.model_type`) under
    what the starting point fixes (`architecture`), built shapes-only by its
    class, so its defaults and its checks are the model's own.

    Args:
        config: the `TrainConfig`.
        architecture: model arguments that override the config's (a
            checkpoint's or `.keras` file's config, openpi weights' variants).

    Returns:
        the model's config dict (`action_dim`, `action_horizon`,
        `max_token_len`, `image_keys`, `image_resolution`, `vocabulary_size`, ...).

    Raises:
        ValueError: model arguments the model does not take or accept.
    """
    from keras_openpi.finetuning import shapes_only

    arguments = dict(config.model)
    if config.model_type != "pi0_fast":
        arguments["pi05"] = config.model_type == "pi05"
    arguments.update(architecture or {})
    cls = model_class(config.model_type)
    try:
        with shapes_only():
            model = cls.from_config(arguments)
    except (TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"config {config.name!r}: its {config.model_type} model ({cls.__name__}) cannot be "
            f"built from model={config.model}: {reason}"
        ) from None
    return model.get_config()


def make_tokenizer(config, settings):
    """The prompt tokenizer of a run, for a model with `settings` (see `model_settings`).

    π0 / π0.5: `byte`, or the PaliGemma SentencePiece file `config.tokenizer`.
    π0-FAST: a `FASTPromptTokenizer` of `config.tokenizer` and the FAST
    tokenizer directory `config.fast_tokenizer`.

    Raises:
        ValueError: a missing or unfit tokenizer, naming the setting.
        FileNotFoundError: a tokenizer file that does not exist.
    """
    from keras_openpi.tokenizers import ByteTokenizer
    from keras_openpi.tokenizers import FASTPromptTokenizer
    from keras_openpi.tokenizers import PaliGemmaTokenizer

    fast = config.model_type == "pi0_fast"
    if config.tokenizer is None:
        raise ValueError(
            f"config {config.name!r} needs the PaliGemma tokenizer: --set "
            "tokenizer=PATH/paligemma_tokenizer.model (gs://big_vision/paligemma_tokenizer.model)."
        )
    max_len = settings["max_token_len"]
    if fast:
        if config.tokenizer == "byte":
            raise ValueError(
                f"config {config.name!r} trains π0-FAST, whose action tokens are PaliGemma "
                "SentencePiece ids: the byte tokenizer cannot write them; --set "
                "tokenizer=PATH/paligemma_tokenizer.model."
            )
        if config.fast_tokenizer is None:
            raise ValueError(
                f"config {config.name!r} trains π0-FAST: give its FAST action tokenizer with "
                "--set fast_tokenizer=DIR (a local copy of physical-intelligence/fast)."
            )
        if not pathlib.Path(config.fast_tokenizer).is_dir():
            raise FileNotFoundError(
                f"fast_tokenizer {config.fast_tokenizer} is not a directory (expected a FAST "
                "tokenizer: a local copy of physical-intelligence/fast)."
            )
        tokenizer = FASTPromptTokenizer(config.tokenizer, config.fast_tokenizer, max_len=max_len)
    elif config.tokenizer == "byte":
        tokenizer = ByteTokenizer(max_len)
    else:
        tokenizer = PaliGemmaTokenizer(config.tokenizer, max_len=max_len)
    if tokenizer.vocabulary_size > settings["vocabulary_size"]:
        raise ValueError(
            f"the tokenizer {config.tokenizer} has {tokenizer.vocabulary_size:,} ids but the "
            f"model's vocabulary has {settings['vocabulary_size']:,} (model.vocabulary_size)."
        )
    return tokenizer


class Trainer:
    """Runs a `TrainConfig`: data, model, `model.fit`, checkpoints, exact resume, export.

    Args:
        config: a `TrainConfig` (`keras_openpi.training.config`).
        checkpoint_dir: the run's directory (default `config.checkpoint_dir`).
        resume: continue from the newest complete checkpoint in `checkpoint_dir`
            (weights, optimizer and EMA state, noise generator, data position);
            newer incomplete ones are moved aside to `<step>.skipped`. A
            finished run whose export is missing is exported again.
        overwrite: remove what a run wrote in `checkpoint_dir` (checkpoints,
            metrics, export, logs); a directory holding anything else is refused.
        max_steps: stop at this global step (default `config.num_train_steps`);
            the last step is always checkpointed, so `resume` continues.
        verbose: `fit`'s verbosity (1: a progress bar; process 0's, the others show none).
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
        if config.on_nonfinite == "skip" and keras.backend.backend() != "jax":
            raise ValueError(
                "on_nonfinite=skip drops the update inside the JAX train step; the backend is "
                f"{keras.backend.backend()}: use on_nonfinite=stop."
            )
        self._check_checkpoint_dir()
        if self.export_only:
            self.prepared = True
            return self
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
        training_data.check_sample(sample)
        architecture = self._architecture()
        if architecture:
            self.settings = model_settings(config, architecture)
        self.tokenizer = make_tokenizer(config, self.settings)
        training_data.check_actions(config, sample, self.settings)
        stats_config = config
        self.asset_id = training_data.asset_id(config)
        if self.resume_state is not None:  # a resumed run normalizes with the stats it started with
            self.asset_id = self.resume_state["asset_id"]
            stats_dir = self.resume_dir / ASSETS_DIR / self.asset_id
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
            shard=data_shard(config.batch_size, config.fsdp_devices),
            workers=config.num_workers,
        )
        if self.resume_state is not None:
            self.loader.restore(self.resume_state["data"])
        self.prepared = True
        return self

    def _architecture(self):
        """The model arguments fixed by the starting point: the checkpoint resumed, or the weights.

        Raises:
            ValueError: the weights are of another model type than the config's.
        """
        config = self.config
        if self.resume_state is not None:
            return read_json(self.resume_dir / MODEL_FILE)["config"]
        if config.weights and config.weights.endswith(".keras"):
            spec = self._keras_spec()
            found = "pi0_fast" if spec["class_name"] == "Pi0Fast" else "pi0"
            if found == "pi0" and spec["config"].get("pi05"):
                found = "pi05"
            self._check_weights_type(found)
            return spec["config"]
        if config.weights:
            return self._openpi_params()[1]
        return {}

    def _keras_spec(self):
        from keras_openpi.convert.keras_file import POLICY_CLASSES

        return read_keras_spec(self.config.weights, expected_classes=POLICY_CLASSES)

    def _check_weights_type(self, found):
        expected = self.config.model_type
        if found != expected:
            names = {"pi0": "π0", "pi05": "π0.5", "pi0_fast": "π0-FAST"}
            raise ValueError(
                f"the weights {self.config.weights} are a {names[found]} model; config "
                f"{self.config.name!r} trains {names[expected]} (model_type {expected})."
            )

    def _check_checkpoint_dir(self):
        """Decides what the run does with its directory: start, resume, re-export, or refuse."""
        directory = self.checkpoint_dir
        self.resume_state, self.resume_dir, self.start_step = None, None, 0
        self.export_only, self.skipped_checkpoints, self.overwritten = False, [], []
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"--checkpoint-dir {directory} is a file, not a directory.")
        if self.overwrite:
            self.overwritten = check_overwritable(directory)
            return
        if not self.resume:
            ours, _ = run_entries(directory)
            steps = step_dirs(directory)
            if steps:
                raise ValueError(
                    f"{directory} already holds checkpoints (steps {steps}): pass --resume "
                    "to continue that run or --overwrite to start over."
                )
            if ours:
                raise ValueError(
                    f"{directory} already holds a run's files ({', '.join(ours)}): pass --resume "
                    "to continue that run or --overwrite to start over."
                )
            return
        point = agree_on_checkpoint(directory, self.end_step)
        if point is None:
            self.log(f"no checkpoint to resume in {directory}: starting a new run")
            return
        for step, problem in point.skipped:
            self.log(f"checkpoint {directory / str(step)} is not usable: {problem}")
        if point.finished:
            exported = export_step(directory / EXPORT_DIR)
            if exported == point.step:
                raise ValueError(
                    f"the run in {directory} is at step {point.step} already and exported to "
                    f"{directory / EXPORT_DIR}; raise num_train_steps / --max-steps above it "
                    f"(now {self.end_step})."
                )
            self.log(
                f"the run in {directory} is finished at step {point.step} but its export is "
                f"{'missing' if exported is None else f'of step {exported}'}: exporting it"
            )
            self.export_only, self.start_step = True, point.step
            return
        if point.skipped:
            self.log(
                f"resuming from step {point.step}, the newest complete checkpoint; the newer "
                "ones move to <step>.skipped"
            )
        changes = check_resume_settings(point.state.get("config"), self.config, point.step_dir)
        if changes:
            listed = "; ".join(f"{key} {a!r} (was {b!r})" for key, a, b in changes)
            self.log(f"resuming with changed settings: {listed}")
        self.resume_state, self.resume_dir, self.start_step = (
            point.state,
            point.step_dir,
            point.step,
        )
        self.skipped_checkpoints = [directory / str(step) for step, _ in point.skipped]

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
            from keras_openpi.convert import openpi_model_type
            from keras_openpi.convert import pi0_config_from_params
            from keras_openpi.convert import pi0_fast_config_from_params

            params = load_openpi_params(self.config.weights)
            self._check_weights_type(openpi_model_type(params))
            if self.config.model_type == "pi0_fast":
                self._params = (params, pi0_fast_config_from_params(params))
            else:
                self._params = (params, pi0_config_from_params(params))
        return self._params

    def _new_model(self, load_weights=True):
        """The config's model with its strategy applied; the checkpoint's model when resuming.

        A π0-FAST model carries the run's tokenizer (`FASTPromptTokenizer`),
        so that its checkpoints and export decode actions.
        """
        config = self.config
        if self.resume_state is not None:
            model = load_model_spec(self.resume_dir)
        elif config.weights and config.weights.endswith(".keras"):
            spec = self._keras_spec()
            spec["config"].update(seed=config.seed, augment=config.augment)
            model = keras.saving.deserialize_keras_object(spec)
            if load_weights:
                load_keras_weights(model, config.weights, expected_classes=(spec["class_name"],))
        else:
            settings = dict(self.settings, seed=config.seed, augment=config.augment)
            model = model_class(config.model_type).from_config(settings)
            if config.weights and load_weights:
                from keras_openpi.convert import load_pi0_fast_weights
                from keras_openpi.convert import load_pi0_weights

                fast = config.model_type == "pi0_fast"
                load = load_pi0_fast_weights if fast else load_pi0_weights
                load(model, self._openpi_params()[0])
                self._params = None
        if model.model_type == "pi0_fast":
            model.set_tokenizer(self.tokenizer)
        if self.resume_state is None:
            model.apply_strategy(config.strategy)
        return model

    def build(self):
        """Builds the model under the distribution and compiles it (restoring it, to resume)."""
        if not self.prepared:
            self.prepare()
        config = self.config
        if process_index() == 0:
            remove_run_entries(self.checkpoint_dir, self.overwritten)
            for step_dir in self.skipped_checkpoints:
                self.log(f"moved {step_dir} to {move_aside(step_dir)}")
        sync("keras_openpi_run_dir")
        keras.utils.set_random_seed(config.seed)
        self.distribution = self._distribution()
        with self._scope():
            self.model = self._new_model()
            # XLA on JAX. TensorFlow trains as a graph (its XLA has no kernel for the
            # Beta draw of the flow-matching times), PyTorch eagerly (torch.compile
            # retraces Keras layers without end).
            jit_compile = keras.backend.backend() == "jax"
            self.model.skip_nonfinite_updates = config.on_nonfinite == "skip"
            self.model.compile(optimizer=make_optimizer(config), jit_compile=jit_compile)
            if self.resume_state is not None:
                self.model.optimizer.build(self.model.trainable_variables)
                self.manager.restore(self.model, self.start_step, verify=False)  # verified
                iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
                if iterations != self.start_step:
                    raise CheckpointError(
                        f"{self.resume_dir}: its optimizer state is at step {iterations}, its "
                        f"state.json at {self.start_step}."
                    )
        self.log(str(self.model.trainable_summary()))
        return self.model

    def _scope(self):
        return (
            self.distribution.scope() if self.distribution is not None else contextlib.nullcontext()
        )

    # === Training ===

    def fit(self, callbacks=()):
        """Trains from the current step to the end step; returns the `History`.

        Raises:
            NonFiniteError: with `on_nonfinite=stop`, at the first step with a
                non-finite loss or gradient norm (nothing from it is saved).
            CheckpointWriteError: a checkpoint could not be written.
        """
        if self.model is None:
            self.build()
        config = self.config
        if process_index() == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            partial = self.checkpoint_dir / f"{CONFIG_FILE}.partial"
            partial.write_text(json.dumps(config.to_dict(), indent=1))
            os.replace(partial, self.checkpoint_dir / CONFIG_FILE)
        steps = self.end_step - self.start_step
        what = f"resuming at step {self.start_step}" if self.start_step else "training"
        self.log(
            f"{what}: {steps} steps to step {self.end_step} of {config.num_train_steps}, batch "
            f"{config.batch_size}; norm stats: {self.norm_stats_origin}; "
            f"checkpoints: {self.checkpoint_dir}"
        )
        metrics = MetricsLogger(self.checkpoint_dir, tensorboard=config.tensorboard)
        skipped = (self.resume_state or {}).get("skipped_steps", 0)
        self.guard = NonFiniteGuard(config.on_nonfinite, self.manager, skipped, log=self.log)
        run_callbacks = [
            metrics,
            self.guard,
            CheckpointSaver(
                self.manager,
                config.save_interval,
                self.end_step,
                loader=self.loader,
                norm_stats=self.norm_stats,
                asset_id=self.asset_id,
                config=config,
                guard=self.guard,
            ),
            *callbacks,
        ]
        with self._scope(), warnings.catch_warnings(), _closing(metrics):
            # The last VLM layer's feed-forward and final norm never reach the
            # action expert (as in openpi), so they get no gradient; Keras warns.
            warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
            history = self.model.fit(
                self.loader,
                epochs=1,
                steps_per_epoch=steps,
                shuffle=False,
                verbose=self.verbose if process_index() == 0 else 0,  # one progress bar
                callbacks=run_callbacks,
            )
        self.start_step = self.end_step
        return history

    def export(self, directory=None):
        """Writes the policy (`policy.keras`, EMA weights when on) and its norm stats, atomically.

        `keras-openpi serve DIR/policy.keras` serves it (the norm stats next to it are found).

        Returns:
            the `.keras` file's path.
        """
        directory = pathlib.Path(directory or self.checkpoint_dir / EXPORT_DIR)
        source = self.manager.step_dir(self.end_step)
        path = directory / EXPORT_MODEL
        if process_index() == 0:
            if process_count() > 1:
                # The weights are spread over the processes: process 0 reads the last
                # checkpoint (always written) on its CPU.
                with keras.device("cpu:0"):
                    export_checkpoint(self.checkpoint_dir, step=self.end_step, output=directory)
            else:
                export_policy(
                    self.model, self.norm_stats, directory, step=self.end_step, source=str(source)
                )
            self.log(f"exported {path} and its norm_stats.json")
        sync("keras_openpi_export")
        return path

    def run(self):
        """prepare → build → fit → export (or, for a finished run without its export, export).

        Returns:
            dict with `step`, `history` (the `History`; None when only exported),
            `checkpoint_dir`, `export` (the `.keras` path) and `skipped_steps`.
        """
        if not self.prepared:
            self.prepare()
        if self.export_only:
            step = self.start_step
            path = self.checkpoint_dir / EXPORT_DIR / EXPORT_MODEL
            if process_index() == 0:
                export_checkpoint(self.checkpoint_dir, step=step)
                self.log(f"exported {path} from checkpoint {step}")
            sync("keras_openpi_export")
            state = read_state(self.checkpoint_dir / str(step))
            return {
                "step": step,
                "history": None,
                "checkpoint_dir": self.checkpoint_dir,
                "export": path,
                "skipped_steps": state.get("skipped_steps", 0),
            }
        self.build()
        history = self.fit()
        path = self.export()
        return {
            "step": self.end_step,
            "history": history,
            "checkpoint_dir": self.checkpoint_dir,
            "export": path,
            "skipped_steps": self.guard.skipped,
        }


def train(config, **kwargs):
    """Runs `config` with a `Trainer` (taking its keyword arguments); returns `Trainer.run()`."""
    return Trainer(config, **kwargs).run()


@contextlib.contextmanager
def _closing(metrics):
    """Closes the metrics files when `fit` ends, also on an error."""
    try:
        yield
    finally:
        metrics.close()
