"""PickScore: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences (transformers)."""

from __future__ import annotations

import torch

from . import register
from .clip import TransformersClipModel

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register("pickscore", value_range="about 16–24 (logit scale × cosine); SD 1.5 images around 20–22",
          description="PickScore human preference")  # fmt: skip
class PickScore:
    """``logit_scale · cos(image, prompt)`` with the ORIGINAL prompt, as PickScore's own scorer computes it.
    ``model`` and ``processor`` are Hub ids or folders written by ``save_pretrained``."""

    def __init__(self, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR, device: str | None = None,
                 precision: str = "fp32"):  # fmt: skip
        self.clip = TransformersClipModel(model, processor, device, precision)

    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        texts = metadata.get("original_prompts", prompts)
        cosine = (self.clip.image_features(images) * self.clip.text_features(texts)).sum(dim=-1)
        return (self.clip.logit_scale * cosine).cpu()
