"""What CI tests with, and what changed since it last passed.

    python .ci/versions.py                      # the installed version of every package pyproject.toml names
    python .ci/versions.py --since FILE         # every installed package whose version differs from FILE's
                                                # (a `pip freeze` of the last passing run), newest first in the log

A leg of .ci/run prints the first at its start; when it fails on the newest releases, the second names the
releases that arrived since the last green run, where a break usually comes from.
"""

import argparse
import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def installed() -> dict[str, str]:
    versions = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions[canonicalize_name(name)] = distribution.version
    return versions


def declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return sorted({canonicalize_name(Requirement(r).name) for r in requirements})


def read_freeze(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--since", type=Path, help="a `pip freeze` of the last passing run")
    args = parser.parse_args()
    versions = installed()
    if args.since is None:
        print(" ".join(f"{name}=={versions.get(name, '(not installed)')}" for name in declared()))
        return
    green = read_freeze(args.since)
    versions.pop(canonicalize_name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]), None)
    changed = [(name, version, green.get(name)) for name, version in sorted(versions.items()) if green.get(name) != version]
    if not changed:
        print(f"every installed package has the version of the last passing run ({args.since.name})")
    for name, version, before in changed:
        print(f"  {name} {version}" + (f" (last passing run: {before})" if before else " (new since the last passing run)"))


if __name__ == "__main__":
    main()
