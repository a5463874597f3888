"""Lets LeRobot 0.6.1 (which declares Python >= 3.12) import on this project's Python 3.11.

LeRobot 0.6.1 uses Python 3.12 syntax in nine declarations (PEP 695 generics and `type` aliases), all outside
its π0 / π0.5 model code; they only type-annotate. This rewrites each to its Python 3.11 equivalent
(`typing.TypeVar` / `typing.Generic`, a plain alias) in the installed package, then byte-compiles every file to
prove nothing else needs 3.12. The model files (`policies/pi0`, `policies/pi05`, `policies/pi_gemma.py`,
`policies/common`) are checked to be left as installed.

Usage: python scripts/lerobot_py311.py SITE_PACKAGES/lerobot
"""

import pathlib
import re
import sys

# `class Name[A, B](Bases):`, `def name[T: Bound](...)`, `type Name = value`, at the start of a line.
_CLASS = re.compile(r"^class (\w+)\[([^\]]+)\](?:\((.*)\))?:")
_DEF = re.compile(r"^def (\w+)\[([^\]]+)\]\(")
_TYPE = re.compile(r"^type (\w+) = ")
_MODEL_FILES = ("policies/pi0/", "policies/pi05/", "policies/pi_gemma.py", "policies/common/")


def _type_vars(params):
    lines = ["import typing as _py311_typing"]
    names = []
    for param in params.split(","):
        name, _, bound = (part.strip() for part in param.partition(":"))
        names.append(name)
        bound_arg = f", bound={bound}" if bound else ""
        lines.append(f'{name} = _py311_typing.TypeVar("{name}"{bound_arg})')
    return lines, names


def _declaration(line):
    """(TypeVar lines, rewritten line) for one PEP 695 declaration, or None."""
    match = _CLASS.match(line)
    if match:
        declared, names = _type_vars(match.group(2))
        bases = [b for b in [match.group(3)] if b]
        bases.append(f"_py311_typing.Generic[{', '.join(names)}]")
        return declared, f"class {match.group(1)}({', '.join(bases)}):" + line[match.end() :]
    match = _DEF.match(line)
    if match:
        declared, _ = _type_vars(match.group(2))
        return declared, f"def {match.group(1)}(" + line[match.end() :]
    match = _TYPE.match(line)
    if match:
        return [], f"{match.group(1)} = " + line[match.end() :]
    return None


def rewrite(source):
    """Returns `source` with PEP 695 declarations in their Python 3.11 form.

    TypeVars are declared just above the declaration and its decorators.
    """
    lines = source.split("\n")
    out = []
    for line in lines:
        found = _declaration(line)
        if found is None:
            out.append(line)
            continue
        declared, line = found
        at = len(out)
        while at > 0 and out[at - 1].startswith("@"):
            at -= 1
        out[at:at] = declared
        out.append(line)
    return "\n".join(out)


def main(package_dir):
    package = pathlib.Path(package_dir)
    changed = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        new = rewrite(source)
        if new != source:
            relative = path.relative_to(package).as_posix()
            if relative.startswith(_MODEL_FILES):
                raise SystemExit(f"refusing to rewrite LeRobot model code {relative}")
            path.write_text(new)
            changed.append(relative)
    for path in sorted(package.rglob("*.py")):
        compile(path.read_text(), str(path), "exec")  # raises on any remaining 3.12-only syntax
    print(f"lerobot_py311: rewrote {len(changed)} files: {', '.join(changed) or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1])
