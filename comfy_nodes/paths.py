"""Where the Parrot nodes find bundles: only in ComfyUI's model folders and in the Hugging Face cache.

A bundle is named in the node by its path relative to one of ComfyUI's ``loras`` or ``parrot`` folders (e.g.
``parrot-sd15`` for ``models/parrot/parrot-sd15/``), or as ``hf:owner/name`` for a Hub bundle already in the local
Hugging Face cache. A name is resolved only by looking it up in the same listing the node offers, so no text a user
types is ever opened as a path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

CONFIG_NAME = "parrot_config.json"  # parrot_pipeline.bundle.CONFIG_NAME; repeated to keep this module light
PARROT_FOLDER = "parrot"
HUB_PREFIX = "hf:"


def local_bundles(
    lora_roots: Sequence[str | os.PathLike], parrot_roots: Sequence[str | os.PathLike]
) -> dict[str, Path]:
    """Bundle name → folder for the bundles under ComfyUI's model folders; the first root holding a name wins.

    Under ``loras`` folders only folders with a ``parrot_config.json`` are bundles (the rest are LoRA files and
    their sub-folders); under ``parrot`` folders every top-level folder is listed too, so an incomplete bundle there
    is reported by the loader instead of silently missing. Hidden folders (a bundle still being written is one) are
    skipped; symlinked folders are followed, as ComfyUI's own model lists do.
    """
    found: dict[str, Path] = {}
    for root, list_children in [(r, False) for r in lora_roots] + [(r, True) for r in parrot_roots]:
        root = Path(root)
        if not root.is_dir():
            continue
        folders = [root / entry for entry in sorted(os.listdir(root))] if list_children else []
        for directory, subdirectories, files in os.walk(root, followlinks=True):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            if CONFIG_NAME in files and Path(directory) != root:
                folders.append(Path(directory))
        for folder in folders:
            if folder.is_dir() and not folder.name.startswith("."):
                found.setdefault(folder.relative_to(root).as_posix(), folder)
    return found


def cached_hub_bundles(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """``hf:owner/name`` → snapshot folder for the Hub model repos in the local cache whose ``main`` revision is a
    bundle. Nothing is downloaded."""
    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return {}
    found = {}
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            if "main" in revision.refs and (revision.snapshot_path / CONFIG_NAME).is_file():
                found[HUB_PREFIX + repo.repo_id] = revision.snapshot_path
    return dict(sorted(found.items()))


def comfy_roots() -> tuple[list[str], list[str]]:
    """ComfyUI's ``loras`` folders and ``parrot`` folders (``models/parrot`` plus any from extra_model_paths.yaml)."""
    import folder_paths  # ComfyUI's module: imported here so that this package imports without ComfyUI

    folder_paths.add_model_folder_path(PARROT_FOLDER, os.path.join(folder_paths.models_dir, PARROT_FOLDER))
    return folder_paths.get_folder_paths("loras"), folder_paths.get_folder_paths(PARROT_FOLDER)


def all_bundles() -> dict[str, Path]:
    """Every bundle the Bundle Loader offers: local ones first, then the Hub cache's."""
    return {**local_bundles(*comfy_roots()), **cached_hub_bundles()}


def resolve_bundle(name: str, bundles: dict[str, Path]) -> Path:
    """The folder of the bundle called ``name`` in a listing from ``all_bundles``."""
    if name not in bundles:
        listed = ", ".join(sorted(bundles)) or "none"
        raise ValueError(
            f"Parrot bundle {name!r} was not found. Put bundle folders in ComfyUI's models/parrot/ or models/loras/ "
            f"(or download a Hub bundle with `hf download owner/name`) and refresh; bundles found: {listed}."
        )
    return bundles[name]
