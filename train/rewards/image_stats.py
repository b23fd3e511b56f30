"""Weight-free image-statistic rewards: they need no checkpoint, so they run anywhere (tests, the quickstart)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from . import register


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for array in _to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


@register("jpeg_compressibility", value_range="(-∞, 0] kB; about -10..-1 at 64 px", description="minus JPEG size")
def jpeg_compressibility(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """Minus the JPEG size (quality 95) in kB: simpler, flatter images score higher (as in DDPO)."""
    return -jpeg_sizes_kb(images)


@register("jpeg_incompressibility", value_range="[0, ∞) kB", description="JPEG size")
def jpeg_incompressibility(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """The JPEG size (quality 95) in kB: detailed, busy images score higher (as in DDPO)."""
    return jpeg_sizes_kb(images)


@register("colorfulness", value_range="[0, ~180]; 0 grey, >100 extremely colourful", description="Hasler–Süsstrunk")
def colorfulness(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """Hasler & Süsstrunk (2003) colourfulness M = σ_rgyb + 0.3·μ_rgyb on 0–255 RGB."""
    rgb = images.detach().float().clamp(0, 1) * 255
    red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    rg = (red - green).flatten(1)
    yb = (0.5 * (red + green) - blue).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return (spread + 0.3 * mean).cpu()


@register("sharpness", value_range="[0, ~0.5]; mean squared Laplacian of luma", description="high-frequency energy")
def sharpness(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """Mean squared response of the 3×3 Laplacian on luma (Rec. 601) in [0, 1]: edges and fine detail."""
    rgb = images.detach().float().clamp(0, 1)
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=luma.device).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(luma, kernel).pow(2).mean(dim=(1, 2, 3)).cpu()
