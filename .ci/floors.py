"""Print a pip constraints file pinning every declared lower bound of pyproject.toml.

    python .ci/floors.py train dev > floors.txt     # the core dependencies and those of the extras named

A package named in several places gets its highest floor. torch is left out: CI installs the oldest build it has
on disk itself (pip would otherwise download a CUDA build of the pinned release).
"""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

UNPINNED = {"torch"}


def floors(project: dict, extras: list[str]) -> dict[str, Version]:
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, Version] = {}
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        for specifier in requirement.specifier:
            if specifier.operator == ">=" and name not in UNPINNED:
                pins[name] = max(pins.get(name, Version(specifier.version)), Version(specifier.version))
    return pins


def main() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    unknown = [extra for extra in sys.argv[1:] if extra not in project["optional-dependencies"]]
    if unknown:
        sys.exit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(project['optional-dependencies'])}")
    for name, version in sorted(floors(project, sys.argv[1:]).items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
