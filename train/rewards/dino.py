"""DINO subject fidelity: cosine of DINO ViT-S/16 [CLS] embeddings, DreamBench's DINO metric."""

from __future__ import annotations

import torch
from transformers import AutoImageProcessor, ViTModel

from . import register
from .clip import load_pretrained, pick_device, to_pil, torch_dtype
from .references import ReferenceEmbeddings

DEFAULT_MODEL = "facebook/dino-vits16"


@register("dino_similarity", value_range="[-1, 1] cosine; DreamBench methods score about 0.6–0.7",
          description="DINO image–image similarity")  # fmt: skip
class DinoSimilarity:
    """Mean cosine similarity between the image's DINO [CLS] embedding and those of the reference images (the
    ``references`` folder, or ``metadata["reference_images"]``; one subject per call). ``model`` is a Hub id or a
    folder written by ``save_pretrained``; preprocessing is its own image processor (PIL backend)."""

    def __init__(self, references: str | None = None, model: str = DEFAULT_MODEL, device: str | None = None,
                 precision: str = "fp32"):  # fmt: skip
        self.name = model
        self.device = pick_device(device)
        self.dtype = torch_dtype(precision)
        self.model = self.processor = None
        self.references = ReferenceEmbeddings(references, self.image_features)

    def load(self) -> None:
        if self.model is not None:
            return
        self.processor = load_pretrained(AutoImageProcessor, self.name, "model", backend="pil")
        vit = load_pretrained(ViTModel, self.name, "model", add_pooling_layer=False, dtype=self.dtype)
        self.model = vit.to(self.device).eval()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        self.load()
        pixels = self.processor(images=to_pil(images), return_tensors="pt").pixel_values
        tokens = self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        return torch.nn.functional.normalize(tokens[:, 0].float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        return (self.image_features(images) @ self.references(metadata).T).mean(dim=1).cpu()
