"""A Stable Diffusion 1.5 checkpoint with random weights and a Parrot bundle for it, built once and cached.

The UNet, VAE and CLIP text encoder have SD 1.5's exact configurations, so ComfyUI's own model detection takes the
checkpoint; ComfyUI itself (DiffusersLoader → CheckpointSave) writes the single file, which is stored in float16
(about 2 GB). The cache is ``$PARROT_COMFY_TEST_CACHE`` (default ``~/.cache/parrot_pipeline/comfy-tests``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from parrot_pipeline import ParrotPipeline
from parrot_pipeline.tiny import _build_once, save_tiny_expander, sd15_components

from ..helpers import add_expander_lora, randomize_lora

VERSION = "v1"
CHECKPOINT = "parrot-sd15-random.safetensors"
BUNDLE = "parrot-sd15-random"
REWARDS = ["aesthetic", "clip_score"]


def cache_root() -> Path:
    return Path(os.environ.get("PARROT_COMFY_TEST_CACHE", Path.home() / ".cache" / "parrot_pipeline" / "comfy-tests"))


def sd15_pipeline() -> ParrotPipeline:
    """SD 1.5's UNet, VAE and text encoder with random weights, in float16."""
    return ParrotPipeline(**sd15_components(torch.float16))


def tiny_expander_base() -> Path:
    return _build_once(cache_root() / f"tiny-expander-{VERSION}", save_tiny_expander)


def build_sd15_assets(server) -> Path:
    """``<cache>/sd15-random-<VERSION>/`` with ``checkpoints/<CHECKPOINT>`` and the bundle ``loras/<BUNDLE>/``,
    built through ``server`` (a running ComfyServer) unless already cached."""
    expander_base = tiny_expander_base()

    def build(folder: Path) -> None:
        pipe = sd15_pipeline()
        diffusers_folder = server.base / "models" / "diffusers" / "sd15-random"
        pipe.save_pretrained(diffusers_folder)
        # transformers 5 saves CLIPTextModel without the "text_model." prefix of SD 1.5's published
        # text_encoder/model.safetensors (transformers 4 keeps it), the layout ComfyUI's loader reads.
        text_encoder_file = diffusers_folder / "text_encoder" / "model.safetensors"
        weights = load_file(text_encoder_file)
        save_file({("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in weights.items()},
                  text_encoder_file)  # fmt: skip
        server.run_ok(
            {
                "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "sd15-random"}},
                "2": {
                    "class_type": "CheckpointSave",
                    "inputs": {
                        "model": ["1", 0],
                        "clip": ["1", 1],
                        "vae": ["1", 2],
                        "filename_prefix": "checkpoints/sd15",
                    },
                },
            }
        )
        server.post("/free", {"unload_models": True, "free_memory": True})
        saved = server.base / "output" / "checkpoints" / "sd15_00001_.safetensors"
        state_dict = {
            key: value.half() if value.is_floating_point() else value for key, value in load_file(saved).items()
        }
        # ComfyUI fills weights it did not find with whatever memory held: check that every weight made it.
        position_embedding = state_dict["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"]
        encoder = pipe.text_encoder.state_dict()  # its keys carry "text_model." under transformers 4, not under 5
        expected = next(v for k, v in encoder.items() if k.endswith("embeddings.position_embedding.weight"))
        if not torch.equal(position_embedding, expected):
            raise RuntimeError("ComfyUI did not load the text encoder of the random SD 1.5 model")
        if not all(torch.isfinite(value).all() for value in state_dict.values() if value.is_floating_point()):
            raise RuntimeError("the random SD 1.5 checkpoint written by ComfyUI has non-finite weights")
        (folder / "checkpoints").mkdir()
        save_file(state_dict, folder / "checkpoints" / CHECKPOINT)
        del state_dict
        saved.unlink()
        shutil.rmtree(diffusers_folder)

        pipe.load_expander(expander_base)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        randomize_lora(pipe.unet, seed=0, scale=0.05)
        add_expander_lora(pipe)
        pipe.save_parrot_weights(folder / "loras" / BUNDLE, reward_names=REWARDS, base_model="sd15-random")

    return _build_once(cache_root() / f"sd15-random-{VERSION}", build)
