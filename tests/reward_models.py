"""Tiny reward models for the tests and the reward benchmark: small configs, random weights, saved in the file
formats and key layouts of the real checkpoints, so the rewards' real loading code runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from parrot_pipeline.tiny import tiny_clip_tokenizer


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_open_clip(seed: int = 0) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_OPEN_CLIP)


def save_tiny_open_clip(folder: Path, seed: int = 0) -> Path:
    """``open_clip_config.json`` + ``open_clip_model.safetensors``: the layout of open_clip repos on the Hub."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_open_clip(seed).state_dict(), folder / "open_clip_model.safetensors")
    preprocess = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic"}
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def add_tiny_open_clip_architecture(folder: Path, name: str = "tiny-open-clip-arch") -> str:
    """Register ``TINY_OPEN_CLIP`` as a built-in open_clip architecture named ``name`` (as ``ViT-H-14`` is one), with
    open_clip's ``add_model_config``; weights then come from a checkpoint file."""
    (folder / f"{name}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def tiny_transformers_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP ViT (width 32, 32 px input) with the tiny CLIP tokenizer and OpenAI's image preprocessing."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def tiny_dino(seed: int = 0) -> tuple[ViTModel, ViTImageProcessorPil]:
    """A ViT-S/16-shaped DINO backbone at width 32 and 32 px, with DINO's processor settings (bilinear, ImageNet)."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8)  # fmt: skip
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=2, image_mean=IMAGENET_MEAN,
                                     image_std=IMAGENET_STD)  # fmt: skip
    return ViTModel(config, add_pooling_layer=False), processor


def save_pretrained_pair(folder: Path, model, processor) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def aesthetic_head_state(embed_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the ``sac+logos+ava1-l14-linearMSE.pth`` layout (layers.0, 2, 4, 6, 7)."""
    generator = torch.Generator().manual_seed(seed)
    widths = [embed_dim, 1024, 128, 64, 16, 1]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    return state
