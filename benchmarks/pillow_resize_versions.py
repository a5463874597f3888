"""How far keras_openpi's resize is from openpi-client's under the installed Pillow.

keras_openpi's `resize_with_pad` (keras_openpi/data/image_tools.py) reproduces
Pillow 13's bilinear resize, which runs the vertical pass first when the
height shrinks by more than twice as many pixels as the width; older Pillow
(openpi's uv.lock pins 11.2.1) always runs the horizontal pass first. This
compares the two on camera-like images (a smooth scene with edges and
noise) of several sizes, resized with padding to 224x224 as openpi does.

Runs in any environment with numpy and Pillow; both modules are loaded from
their files (openpi-client's `image_tools.py` from an openpi checkout), so
keras_openpi need not be installed:

    python3.11 -m venv /tmp/pil11 && /tmp/pil11/bin/pip install numpy==1.26.4 pillow==11.2.1
    /tmp/pil11/bin/python benchmarks/pillow_resize_versions.py --openpi-src /tmp/openpi \\
        --json benchmarks/results/pillow_resize_11.2.1.json
"""

import argparse
import importlib.util
import json
import pathlib

import numpy as np
import PIL

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (height, width): common camera sizes, an upscale, and tall images (height > 2 x width).
SIZES = [(480, 640), (720, 1280), (240, 320), (96, 96), (640, 480), (960, 400), (1280, 480)]


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def camera_like(height, width, seed):
    """A uint8 scene: gradients, a few hard-edged boxes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([120 + 80 * x, 100 + 60 * y, 140 - 50 * x * y], axis=-1)
    for _ in range(12):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        size = rng.integers(8, max(9, min(height, width) // 3))
        image[top : top + size, left : left + size] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openpi-src", required=True, help="an openpi checkout")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--images", type=int, default=4, help="images per size")
    args = parser.parse_args()
    client = pathlib.Path(args.openpi_src) / "packages/openpi-client/src/openpi_client/image_tools.py"
    openpi = load(client, "openpi_image_tools")
    ours = load(ROOT / "keras_openpi/data/image_tools.py", "keras_openpi_image_tools")
    results = []
    for height, width in SIZES:
        images = np.stack([camera_like(height, width, seed) for seed in range(args.images)])
        a = openpi.resize_with_pad(images, 224, 224).astype(np.int16)
        b = ours.resize_with_pad(images, 224, 224).astype(np.int16)
        differ = a != b
        results.append(
            {
                "size": [height, width],
                # Pillow 13 runs the vertical pass first here (height shrinks > 2x the width).
                "vertical_pass_first": height > 2 * width and height > 224,
                "pixels_differing": float(differ.any(axis=-1).mean()),
                "max_abs_difference": int(np.abs(a - b).max()),
            }
        )
        print(results[-1])
    report = {"pillow": PIL.__version__, "images_per_size": args.images, "results": results}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
