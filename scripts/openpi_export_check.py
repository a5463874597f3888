"""openpi's own code on `export openpi` output: `restore_params`, `config.load`, `sample_actions`.

The tests check the exported tree against openpi's (every path, shape and
dtype, from the reference fixtures) and the round trip bit for bit; this
script closes the loop where an openpi environment is available (made as
`tests/fixtures/openpi/generate.py`'s docstring says; never in CI):

    python scripts/openpi_export_check.py --openpi-python /tmp/openpi_venv/bin/python \\
        --openpi-src /tmp/openpi [--json benchmarks/results/openpi_export_check.json]

For each case a fixture model (`tests/fixtures/openpi`, openpi's tiny sizes)
is changed as a fine-tuning would change it, then exported with
`export_openpi`:

- `pi0`, `pi05`: every weight moved by N(0, 0.01);
- `pi0_lora_merged`: Keras-form LoRA (rank 4) with random adapters, merged on export;
- `pi0_lora_kept`: openpi-form LoRA (rank 4), exported unmerged (`keep_lora`)
  and restored into openpi's LoRA config (`dummy_lora`: rank 4, alpha 4).

openpi's process restores the directory with `restore_params`, builds its
model with `config.load` (which checks every path and shape against the
config's own model) and samples with the fixture's noise (10 Euler steps);
keras_openpi samples the same inputs and noise. The largest absolute
difference of the actions must be under 1e-4; the results go to the JSON and
the exit status is 1 otherwise.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "openpi"
TOLERANCE = 1e-4
NUM_STEPS = 10
# case -> (fixture, openpi's Gemma variant, how the model is changed)
CASES = {
    "pi0": ("pi0", "dummy", "moved"),
    "pi05": ("pi05", "dummy", "moved"),
    "pi0_lora_merged": ("pi0", "dummy", "lora-keras"),
    "pi0_lora_kept": ("pi0", "dummy_lora", "lora-openpi"),
}


def _fixture(name):
    import numpy as np

    data = {}
    for path in (FIXTURES / f"{name}.npz", FIXTURES / "pi0_inputs.npz"):
        with np.load(path) as stored:
            data.update({k: stored[k] for k in stored.files})
    return data, eval(str(data["meta"]))  # a repr'd dict of plain values (the fixture's own)


def _finetuned(name, change, seed):
    """The fixture's model, changed as a fine-tuning would change it."""
    import keras
    import numpy as np

    from keras_openpi.convert import pi0_from_openpi

    data, meta = _fixture(name)
    model = pi0_from_openpi(
        FIXTURES / f"{name}.npz", action_horizon=meta["action_horizon"],
        max_token_len=meta["max_token_len"], model="pi05" if meta["pi05"] else "pi0",
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)  # the adapters' initializers
    if change == "moved":
        weights = model.weights
    else:
        model.enable_lora(rank=4, form="keras" if change == "lora-keras" else "openpi")
        weights = [w for w in model.weights if "lora" in w.path]
        if not weights:
            raise RuntimeError("enable_lora added no adapters")
    for weight in weights:
        value = np.asarray(weight.numpy())
        scale = 0.01 if change == "moved" else 0.05
        weight.assign((value + rng.normal(0, scale, value.shape)).astype(value.dtype))
    return model, data, meta


def keras_side(args):
    import keras
    import numpy as np

    from keras_openpi.convert import export_openpi

    results = {}
    for index, (case, (name, variant, change)) in enumerate(CASES.items()):
        model, data, meta = _finetuned(name, change, seed=index)
        out = pathlib.Path(args.workdir) / case
        export_openpi(model, out, keep_lora=change == "lora-openpi")
        observation = {
            "image": {k: data[f"input/images/{k}"] for k in model.image_keys},
            "image_mask": {k: data[f"input/masks/{k}"] for k in model.image_keys},
            "state": data["input/state"],
            "tokenized_prompt": data["input/toks"],
            "tokenized_prompt_mask": data["input/tmask"],
        }
        ours = keras.ops.convert_to_numpy(
            model.sample_actions(observation, noise=data["input/noise"], num_steps=NUM_STEPS)
        )
        inputs = out / "inputs.npz"
        np.savez(inputs, **{k: v for k, v in data.items() if k.startswith("input/")})
        theirs = out / "openpi_actions.npy"
        command = [
            args.openpi_python, __file__, "--openpi-side", "--openpi-src", args.openpi_src,
            "--exported", out, "--inputs", inputs, "--variant", variant,
            "--meta", json.dumps(meta), "--output", theirs,
        ]  # fmt: skip
        run = subprocess.run(list(map(str, command)), capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"openpi's side failed on {case}:\n{run.stderr[-3000:]}")
        actions = np.load(theirs)
        error = float(np.abs(actions - ours).max())
        moved = float(np.abs(ours - data["output/sampled"]).max())
        results[case] = dict(
            fixture=name, openpi_variant=variant, change=change, actions_shape=list(ours.shape),
            max_abs_difference=error, within_tolerance=error < TOLERANCE,
            difference_from_the_unchanged_fixture=moved,
        )  # fmt: skip
        print(f"{case:18s} max |openpi - keras_openpi| = {error:.2e} "
              f"(the change moved the actions by {moved:.2e})", flush=True)  # fmt: skip
    return results


def openpi_side(args):
    """Runs in openpi's environment: restore the export, load it into openpi's model, sample."""
    sys.path.insert(0, str(FIXTURES))
    from generate import import_openpi
    from generate import openpi_observation

    import_openpi(args.openpi_src)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from openpi.models import model as openpi_model
    from openpi.models import pi0_config

    meta = json.loads(args.meta)
    config = pi0_config.Pi0Config(
        dtype="float32", paligemma_variant=args.variant, action_expert_variant=args.variant,
        action_dim=meta["action_dim"], action_horizon=meta["action_horizon"],
        max_token_len=meta["max_token_len"], pi05=meta["pi05"],
    )  # fmt: skip
    params = openpi_model.restore_params(pathlib.Path(args.exported) / "params")
    model = config.load(params, remove_extra_params=False)  # every array must be openpi's
    with np.load(args.inputs) as data:
        inputs = {k: data[k] for k in data.files}
    actions = model.sample_actions(
        jax.random.key(0), openpi_observation(inputs), noise=jnp.asarray(inputs["input/noise"]),
        num_steps=NUM_STEPS,
    )
    np.save(args.output, np.asarray(actions))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--openpi-python", help="python of openpi's environment")
    parser.add_argument("--openpi-src", required=True, help="an openpi checkout")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="where the results go")
    parser.add_argument("--openpi-side", action="store_true", help=argparse.SUPPRESS)
    for name in ("--exported", "--inputs", "--variant", "--meta", "--output"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.openpi_side:
        return openpi_side(args)
    if not args.openpi_python:
        parser.error("--openpi-python is required (the python of openpi's environment).")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    with tempfile.TemporaryDirectory(prefix="openpi_export_check_") as workdir:
        args.workdir = workdir
        results = keras_side(args)
    versions = subprocess.run(
        [args.openpi_python, "-c", "import jax, flax, orbax.checkpoint as o; "
         "print(f'jax {jax.__version__}, flax {flax.__version__}, orbax {o.__version__}')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    record = dict(
        command="python scripts/openpi_export_check.py --openpi-python PY --openpi-src SRC",
        openpi_environment=versions, tolerance=TOLERANCE, num_steps=NUM_STEPS, cases=results,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    failed = [case for case, result in results.items() if not result["within_tolerance"]]
    if failed:
        print(f"over {TOLERANCE}: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
