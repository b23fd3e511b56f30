"""Fixtures of the ComfyUI integration suite: one real ComfyUI server for the session, with this checkout in its
custom_nodes/, the cached random SD 1.5 checkpoint and bundle in its model folders, and broken bundles to refuse."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..helpers import add_to_hub_cache
from .assets import BUNDLE, VERSION, build_sd15_assets, cache_root
from .server import ComfyServer

REPO = Path(__file__).resolve().parents[2]
HUB_BUNDLE = "parrot-tests/sd15-random"


def make_bad_bundles(parrot_folder: Path, tiny_bundle: Path) -> None:
    """Bundles the loader must refuse, in ComfyUI's models/parrot/."""
    (parrot_folder / "no-config").mkdir(parents=True)
    shutil.copy(tiny_bundle / "parrot_lora_kohya.safetensors", parrot_folder / "no-config")
    shutil.copytree(tiny_bundle, parrot_folder / "pickled")
    (parrot_folder / "pickled" / "extra_weights.bin").write_bytes(b"\x80\x04K\x01.")
    shutil.copytree(tiny_bundle, parrot_folder / "other-architecture")
    shutil.copytree(tiny_bundle, parrot_folder / "no-expander-folder")
    shutil.rmtree(parrot_folder / "no-expander-folder" / "expander")
    shutil.copytree(tiny_bundle, parrot_folder / "corrupt-kohya")
    (parrot_folder / "corrupt-kohya" / "parrot_lora_kohya.safetensors").write_bytes(b"this is not a safetensors file")


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, bundle_dir) -> Path:
    """ComfyUI's base directory (--base-directory): custom_nodes/ with this checkout, models/ with the cache."""
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "parrot-pipeline").symlink_to(REPO, target_is_directory=True)
    assets = cache_root() / f"sd15-random-{VERSION}"
    (base / "models").mkdir()
    (base / "models" / "checkpoints").symlink_to(assets / "checkpoints", target_is_directory=True)
    (base / "models" / "loras").symlink_to(assets / "loras", target_is_directory=True)
    make_bad_bundles(base / "models" / "parrot", bundle_dir)
    (base / "hf-cache").mkdir()
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    server = ComfyServer(
        Path(os.environ["COMFYUI_PATH"]),
        comfy_base,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(comfy_base / "hf-cache"), "PYTHONUNBUFFERED": "1"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sd15(comfy_server, comfy_base) -> Path:
    """The cached random SD 1.5 assets (built through the server on first use); the bundle is also put in the
    server's Hugging Face cache as ``HUB_BUNDLE``, and a copy whose expander base model is gone in models/parrot/."""
    assets = build_sd15_assets(comfy_server)
    add_to_hub_cache(comfy_base / "hf-cache", HUB_BUNDLE, assets / "loras" / BUNDLE)
    missing_base = comfy_base / "models" / "parrot" / "missing-expander-base"
    shutil.copytree(assets / "loras" / BUNDLE, missing_base)
    config = json.loads((missing_base / "parrot_config.json").read_text())
    config["expander"]["base_model"] = str(comfy_base / "deleted-expander-base")
    (missing_base / "parrot_config.json").write_text(json.dumps(config))
    return assets
