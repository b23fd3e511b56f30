"""Training checkpoints: ``checkpoints/step_N/`` folders that are complete or absent, never half written.

A checkpoint is one ``state.safetensors`` (every tensor of the run's state) and one ``state.json`` (everything else,
with references to the tensors), plus ``manifest.json`` with each file's size and SHA-256, written last. The folder
is built under a temporary name and renamed into place, so a run killed at any moment leaves the previous
checkpoint or the new one. Nothing is unpickled: optimiser, scheduler and RNG states are split into tensors and
JSON by :func:`split_state`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step_(\d+)$")
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
MANIFEST_FILE = "manifest.json"


def split_state(value, tensors: dict[str, torch.Tensor], key: str = "state"):
    """A nested state (dicts with any keys, lists, tuples, tensors, numpy arrays, scalars) as a JSON-able structure;
    tensors are moved into ``tensors`` under path-like keys and referenced by them."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, np.ndarray):  # numpy's RNG state: uint32 words, kept exactly in int64
        tensors[key] = torch.from_numpy(value.astype(np.int64))
        return {"ndarray": key, "dtype": str(value.dtype)}
    if isinstance(value, dict):  # keys may be ints (optimiser states): keep them as pairs
        return {"dict": [[k, split_state(v, tensors, f"{key}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [split_state(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"Cannot store a {type(value).__name__} in a checkpoint (at {key!r}).")


def join_state(structure, tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`split_state`."""
    (kind, content), *_ = structure.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "ndarray":
        return tensors[content].numpy().astype(structure["dtype"])
    if kind == "dict":
        return {k: join_state(v, tensors) for k, v in content}
    if kind == "list":
        return [join_state(v, tensors) for v in content]
    if kind == "tuple":
        return tuple(join_state(v, tensors) for v in content)
    return content


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def step_folders(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Renamed (so once complete) checkpoint folders, newest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in checkpoints_dir.iterdir() if (m := STEP_PATTERN.match(path.name))]
    return sorted(found, reverse=True)


def write_checkpoint(checkpoints_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``checkpoints_dir/step_<step>``, then keep only the newest ``keep`` checkpoints.

    A failure while writing (a full disk) removes the partial folder and leaves the previous checkpoints as they were.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoints_dir / f"step_{step:06d}"
    if target.exists():
        try:  # a run resumed from this step and stopped before the next: its state is this one
            read_checkpoint(target)
            return target
        except ValueError:  # a corrupt copy (the run resumed from an earlier one): nothing of value to keep
            shutil.rmtree(target)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=checkpoints_dir))
    try:
        tensors: dict[str, torch.Tensor] = {}
        structure = split_state(state, tensors)
        _write_synced(building / TENSORS_FILE, lambda path: save_file(tensors, path))
        _write_synced(building / JSON_FILE, lambda path: path.write_text(json.dumps(structure), encoding="utf-8"))
        manifest = {name: {"bytes": (building / name).stat().st_size, "sha256": sha256_of(building / name)}
                    for name in (TENSORS_FILE, JSON_FILE)}  # fmt: skip
        _write_synced(building / MANIFEST_FILE, lambda path: path.write_text(json.dumps(manifest), encoding="utf-8"))
        os.rename(building, target)
    except OSError as error:
        shutil.rmtree(building, ignore_errors=True)
        previous = step_folders(checkpoints_dir)
        kept = f"the previous checkpoint {previous[0][1]} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(error.errno, f"Writing checkpoint {target} failed ({error.strerror or error}); {kept}.") from error
    for _, old in step_folders(checkpoints_dir)[keep:]:
        shutil.rmtree(old)
    return target


def read_checkpoint(folder: Path) -> dict:
    """The state saved in ``folder``; raises ``ValueError`` naming the file when anything is missing or corrupt."""
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest_path}: unreadable ({error})") from None
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
            raise ValueError(f"{path}: missing, truncated or corrupt (size or SHA-256 differs from the manifest)")
    structure = json.loads((folder / JSON_FILE).read_text(encoding="utf-8"))
    return join_state(structure, load_file(folder / TENSORS_FILE))


def latest_checkpoint(checkpoints_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads back completely; broken ones are skipped with a warning naming them."""
    for _, folder in step_folders(checkpoints_dir):
        try:
            return folder, read_checkpoint(folder)
        except ValueError as error:
            logger.warning("Skipping checkpoint %s: %s. Trying the previous one.", folder, error)
    return None


def remove_partial_checkpoints(checkpoints_dir: Path) -> None:
    """Temporary folders of checkpoints whose writing was killed."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob(".step_*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
