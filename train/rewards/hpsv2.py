"""Human Preference Score v2.1: an open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2)."""

from __future__ import annotations

import torch

from . import register
from .clip import OpenClipModel

DEFAULT_CHECKPOINT = "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt"


@register("hpsv2", value_range="about 0.2–0.35 (cosine); higher means more preferred", description="HPS v2.1")
class HPSv2:
    """Cosine similarity of the image and the ORIGINAL prompt in HPS v2.1's embedding space, as its own scorer
    computes it. ``model`` is the built-in open_clip architecture (``ViT-H-14``) and ``checkpoint`` the HPS weights,
    a ``{"state_dict": …}`` file (local, or ``hf-hub:owner/repo/file``) that open_clip loads with
    ``weights_only=True``. Images are preprocessed as HPS's scorer does: the longest side resized to the input size,
    then padded with black to a square."""

    def __init__(self, model: str = "ViT-H-14", checkpoint: str = DEFAULT_CHECKPOINT, device: str | None = None,
                 precision: str = "fp32"):  # fmt: skip
        self.clip = OpenClipModel(model, device, precision, checkpoint=checkpoint, resize_mode="longest")

    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        texts = metadata.get("original_prompts", prompts)
        return (self.clip.image_features(images) * self.clip.text_features(texts)).sum(dim=-1).cpu()
