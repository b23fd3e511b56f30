"""CLIP rewards with open_clip: text–image alignment (CLIPScore) between an image and the ORIGINAL prompt."""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image

from . import register

# OpenAI's ViT-B/32 CLIP, as the Parrot paper's text–image alignment reward, in open_clip's Hub layout.
DEFAULT_CLIP_MODEL = "hf-hub:timm/vit_base_patch32_clip_224.openai"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images [N, 3, H, W] in [0, 1] as 8-bit PIL images, what the models' own preprocessing expects."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(array)) for array in arrays]


class OpenClipModel:
    """An open_clip model, tokenizer and preprocessing, loaded on first use.

    ``model`` is an open_clip name with schema: ``hf-hub:owner/repo`` or ``local-dir:/path`` (a folder holding
    ``open_clip_config.json`` and the weights, as on the Hub).
    """

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str | None = None, precision: str = "fp32"):
        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = precision
        self.model = self.preprocess = self.tokenizer = None

    def load(self) -> None:
        if self.model is not None:
            return
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                self.name, device=self.device, precision=self.precision
            )
            self.tokenizer = open_clip.get_tokenizer(self.name)
        except (OSError, RuntimeError, ValueError) as error:
            raise OSError(
                f"Could not load the open_clip model {self.name!r} ({type(error).__name__}: {error}). Offline, "
                "download it once where the Hub is reachable and point the reward at the folder with "
                "reward_options: {<reward>: {model: 'local-dir:/path/to/folder'}}."
            ) from error
        self.model.eval()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        self.load()
        pixels = torch.stack([self.preprocess(image) for image in to_pil(images)]).to(self.device)
        features = self.model.encode_image(pixels.to(next(self.model.parameters()).dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        self.load()
        features = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1)


@register("clip_score", value_range="[-1, 1] cosine; [0, 100] with scale_100", description="CLIP text–image alignment")
class ClipScore:
    """Cosine similarity of the image and the ORIGINAL prompt (``metadata["original_prompts"]``, else ``prompts``)
    in an open_clip model's embedding space; ``scale_100`` gives the CLIPScore convention ``100 · max(cos, 0)``."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, scale_100: bool = False, device: str | None = None,
                 precision: str = "fp32"):  # fmt: skip
        self.clip = OpenClipModel(model, device, precision)
        self.scale_100 = scale_100

    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        texts = metadata.get("original_prompts", prompts)
        cosine = (self.clip.image_features(images) * self.clip.text_features(texts)).sum(dim=-1).cpu()
        return 100 * cosine.clamp(min=0) if self.scale_100 else cosine
