"""The package's imports run one way: each layer imports only the layers below it.

Every `import` in the package is read (those inside functions too, which
lazy imports use), so a lazy import cannot hide an upward one.
"""

import ast
import pathlib

import pytest

import keras_openpi

PACKAGE = pathlib.Path(keras_openpi.__file__).resolve().parent
# From the ground up. Parts of one layer do not import each other.
LAYERS = (
    ("backend", "checkpoint_format", "data", "tokenizers"),
    ("layers",),
    ("finetuning",),
    ("models",),
    ("convert",),
    ("serving", "training"),
    ("commands",),
    ("cli",),
    ("__main__",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part(path, root):
    """The top-level part of the package a file belongs to: `models` for `models/pi0.py`."""
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path, root=PACKAGE):
    """`[(line, part)]`: the package parts a file imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["keras_openpi", *path.relative_to(root).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from keras_openpi import models` imports the part `models`.
            modules = [f"{module}.{alias.name}" for alias in node.names] if module == "keras_openpi" else [module]
        else:
            continue
        for module in modules:
            names = module.split(".")
            if names[0] == "keras_openpi" and len(names) > 1:
                found.append((node.lineno, names[1]))
    return found


def upward_imports(root=PACKAGE):
    """Every import from a lower layer to a higher one (or across one layer), as readable lines."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        source = _part(path, root)
        if source == "__init__":
            continue  # the package's face: lazy re-exports of the public names
        if source not in RANK:
            bad.append(f"{path.relative_to(root)}: not in any layer of LAYERS")
            continue
        for line, target in imported_parts(path, root):
            if target == source or RANK.get(target, len(LAYERS)) < RANK[source]:
                continue
            bad.append(f"{path.relative_to(root)}:{line} ({source}) imports {target}")
    return bad


def test_every_import_runs_down_the_layers():
    assert upward_imports() == []


def test_an_upward_import_is_found(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "loader.py").write_text(
        "def load():\n    from keras_openpi.training import trainer\n"
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pi0.py").write_text("from ..layers import siglip\nfrom ..serving import policy\n")
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "policy.py").write_text("from keras_openpi import training\n")
    assert upward_imports(tmp_path) == [
        "data/loader.py:2 (data) imports training",
        "models/pi0.py:2 (models) imports serving",
        "serving/policy.py:1 (serving) imports training",
    ]


@pytest.mark.parametrize("part", sorted(RANK))
def test_every_layer_exists(part):
    assert (PACKAGE / part).is_dir() or (PACKAGE / f"{part}.py").is_file()
