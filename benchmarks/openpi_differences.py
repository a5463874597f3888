"""Measures the differences from openpi that keras_openpi keeps on purpose (docs/architecture.md).

Each measurement runs openpi's own function next to keras_openpi's on the same
inputs; openpi's functions are read from an openpi checkout (`ast`, so that
openpi's heavy imports are not needed):

- quantiles: `norm-stats` default (`exact`) against `--quantiles openpi`
  (openpi's RunningStats, reproduced exactly: tests/test_openpi_running_stats.py)
  on ALOHA transfer-cube demonstrations recorded by
  examples/aloha_sim/scripted_expert.py, with 50-step action chunks; the gap
  in data units and in normalized units (what the model sees);
- image clipping: openpi's `_parse_image` (`(255 * x).astype(uint8)`) against
  `to_uint8_hwc` over float values from -1 to 2;
- padding: openpi's `pad_to_dim` against `PadStatesAndActions` for state widths
  around the model's action_dim.

    .venv-sim/bin/python examples/aloha_sim/scripted_expert.py --num-episodes 25 \\
        --output /tmp/demos --cameras top --image-size 16 16
    .venv/bin/python benchmarks/openpi_differences.py --openpi-src /tmp/openpi \\
        --aloha-demos /tmp/demos --json benchmarks/results/openpi_differences.json

(The resize difference, which depends on the Pillow version, is measured by
benchmarks/pillow_resize_versions.py.)
"""

import argparse
import ast
import json
import pathlib
import warnings

import numpy as np

from keras_openpi.data.image_tools import to_uint8_hwc
from keras_openpi.data.running_stats import compute_norm_stats
from keras_openpi.data.normalize import normalize
from keras_openpi.data.transforms import PadStatesAndActions

HORIZON = 50
ACTION_DIM = 32


def openpi_function(openpi_src, relative_path, name, namespace):
    """One top-level function of an openpi source file, compiled alone in `namespace`."""
    tree = ast.parse((pathlib.Path(openpi_src) / relative_path).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    node.returns = None
    for arg in node.args.args + node.args.kwonlyargs:
        arg.annotation = None
    module = ast.Module(body=[node], type_ignores=[])
    exec(compile(module, f"openpi:{relative_path}", "exec"), namespace)
    return namespace[name]


def aloha_samples(demos_dir):
    """Per frame: `state` (14,) and the next 50 actions (last one repeated), as LeRobot gives them."""
    samples = []
    for path in sorted(pathlib.Path(demos_dir).glob("episode_*.npz")):
        with np.load(path) as episode:
            state, action = episode["state"], episode["action"]
        index = np.minimum(np.arange(len(action))[:, None] + np.arange(HORIZON), len(action) - 1)
        samples += [{"state": s, "actions": a} for s, a in zip(state, action[index])]
    return samples


def quantile_gap(samples, batch_size=32):
    # openpi leaves out the frames past the last full batch: compare on the same frames.
    samples = samples[: len(samples) // batch_size * batch_size]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = compute_norm_stats(samples)
        openpi = compute_norm_stats(samples, quantiles="openpi", batch_size=batch_size)
    report = {"frames": len(samples), "batch_size": batch_size}
    for key in ("state", "actions"):
        values = np.concatenate([np.reshape(s[key], (-1, 14)) for s in samples])
        a, b = exact[key], openpi[key]
        spread = a.q99 - a.q01
        gap = np.abs(normalize(values, a, True) - normalize(values, b, True))
        report[key] = {
            "vectors": len(values),
            "max_abs_q01_gap": float(np.abs(a.q01 - b.q01).max()),
            "max_abs_q99_gap": float(np.abs(a.q99 - b.q99).max()),
            "max_q_gap_over_range": float(
                (np.maximum(np.abs(a.q01 - b.q01), np.abs(a.q99 - b.q99)) / spread).max()
            ),
            "normalized_gap_max": float(gap.max()),
            "normalized_gap_mean": float(gap.mean()),
            "max_abs_mean_gap": float(np.abs(a.mean - b.mean).max()),
            "max_rel_std_gap": float((np.abs(a.std - b.std) / np.maximum(a.std, 1e-12)).max()),
            "normalized_gap_per_dim_max": gap.max(axis=0).round(4).tolist(),
        }
    return report


def clipping(openpi_src):
    parse = openpi_function(
        openpi_src, "src/openpi/policies/libero_policy.py", "_parse_image", {"np": np}
    )
    values = np.linspace(-1.0, 2.0, 30001, dtype=np.float32)
    image = np.broadcast_to(values[:, None, None], (len(values), 1, 3)).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = parse(image)[:, 0, 0].astype(int)
    ours = to_uint8_hwc(image)[:, 0, 0].astype(int)
    same = values[theirs == ours]
    probes = np.float32([-0.01, -0.003, 1.003, 1.01, 1.5, 2.0])
    probes = {
        f"{v:g}": [int(t), int(o)] for v, t, o in zip(values, theirs, ours) if v in probes
    }
    return {
        "identical_from": float(same.min()),
        "identical_to": float(same.max()),
        "max_level_difference": int(np.abs(theirs - ours).max()),
        "openpi_vs_ours_at": probes,
    }


def padding(openpi_src):
    pad = openpi_function(openpi_src, "src/openpi/transforms.py", "pad_to_dim", {"np": np})
    report = {}
    for width in (8, 14, 32, 33, 40):
        state = np.arange(width, dtype=np.float32)
        theirs = pad(state, ACTION_DIM, axis=-1)
        try:
            ours = PadStatesAndActions(ACTION_DIM)({"state": state})["state"]
            outcome = "equal" if np.array_equal(theirs, ours) else "different"
        except ValueError as error:
            outcome = f"keras_openpi refuses: {error}"
        report[str(width)] = {"openpi_shape": list(theirs.shape), "outcome": outcome}
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openpi-src", required=True, help="an openpi checkout")
    parser.add_argument("--aloha-demos", required=True, help="scripted_expert.py's output")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    report = {
        "numpy": np.__version__,
        "quantiles": quantile_gap(aloha_samples(args.aloha_demos)),
        "clipping": clipping(args.openpi_src),
        "padding": padding(args.openpi_src),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
