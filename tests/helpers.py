"""Helpers shared by the tests."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from peft import LoraConfig

from parrot_pipeline import ParrotPipeline
from parrot_pipeline.expansion import add_lora

STEPS = 4
SIZE = 64


def load(path, **kwargs) -> ParrotPipeline:
    pipe = ParrotPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_lora(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """LoRA B starts at zero (no effect); give every LoRA matrix random values so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def add_unet_lora(pipe: ParrotPipeline, seed: int = 0, rank: int = 4, alpha: int = 8, cross_attention_only=False):
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"] if cross_attention_only else [
        "to_q", "to_k", "to_v", "to_out.0"
    ]
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    randomize_lora(pipe.unet, seed)


def add_expander_lora(pipe: ParrotPipeline, seed: int = 1):
    pipe.register_modules(expander=add_lora(pipe.expander, rank=4))
    randomize_lora(pipe.expander, seed, scale=0.5)


def add_to_hub_cache(cache_dir, repo_id: str, folder, commit: str = "0" * 40):
    """Put ``folder`` in a Hugging Face cache as model repo ``repo_id`` (its ``main`` revision), in the cache's own
    layout: content-addressed blobs, and a snapshot of symlinks to them."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            link = repo / "snapshots" / commit / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


def two_process_launch(script: str, *args: str) -> list[str]:
    """``accelerate launch`` of ``script`` in two CPU processes (torchrun; the config's ``device: cpu`` makes them
    use gloo) on a free port, so runs side by side do not collide on torchrun's default port 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), script, *args]  # fmt: skip
