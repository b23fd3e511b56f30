"""RPO's λ-harmonic reward: a weighted harmonic mean of subject fidelity and text alignment (METHODS §4)."""

from __future__ import annotations

import re

import torch

from . import register
from .clip import OPEN_CLIP_SCHEMAS, OpenClipModel, TransformersClipModel
from .references import ReferenceEmbeddings
from .tiny import TinyAlign

# ALIGN, the vision–language model RPO's authors used.
DEFAULT_MODEL = "kakaobrain/align-base"


def dual_encoder(model: str, device: str | None, precision: str) -> OpenClipModel | TransformersClipModel:
    """open_clip for names with its schema (``hf-hub:``, ``local-dir:``); ``tiny`` for a small random ALIGN (offline
    runs that exercise the method); transformers for any other id or folder."""
    if model.startswith(OPEN_CLIP_SCHEMAS):
        return OpenClipModel(model, device, precision)
    if model == "tiny":
        return TinyAlign(device, precision)
    return TransformersClipModel(model, device=device, precision=precision)


def lambda_harmonic(subject: torch.Tensor, alignment: torch.Tensor, lam: float) -> torch.Tensor:
    """``1 / (λ / S_I + (1 − λ) / S_T)``: the weighted harmonic mean of subject fidelity and text alignment."""
    return 1 / (lam / subject + (1 - lam) / alignment)


def remove_identifier(text: str, identifier: str | None) -> str:
    """The prompt without the subject identifier, as text alignment is scored: the word wherever it stands, with
    its possessive, punctuation kept ("a sks dog" → "a dog", "a photo of sks, on a beach" → "a photo of, on a
    beach", "sks's collar" → "collar")."""
    if identifier:
        text = re.sub(rf"(?<![\w']){re.escape(identifier)}(?:['’]s)?(?![\w'])", "", text)
    return re.sub(r"\s+([,.;:!?])", r"\1", " ".join(text.split())).lstrip(",.;:!? ")


@register("lambda_harmonic", value_range="[0, 1]; RPO's λ = 0.5 models reach about 0.6–0.7",
          description="RPO λ-harmonic subject fidelity + text alignment")  # fmt: skip
class LambdaHarmonic:
    """``r = 1 / (λ / S_I + (1 − λ) / S_T)``, with ``S_I`` the mean over reference images of ``(cos(x, ref) + 1) / 2``
    and ``S_T = (cos(x, c) + 1) / 2`` for the ORIGINAL prompt ``c`` with the subject ``identifier`` (e.g. ``sks``)
    removed. λ = 1 is pure subject fidelity, λ = 0 pure text alignment (``lam`` is λ).

    ``model`` is ALIGN by default (transformers); an open_clip name with its schema uses CLIP. The reference images
    come from the ``references`` folder or from ``metadata["reference_images"]`` (one subject per call).
    """

    def __init__(self, lam: float = 0.5, references: str | None = None, identifier: str | None = None,
                 model: str = DEFAULT_MODEL, device: str | None = None, precision: str = "fp32"):  # fmt: skip
        if not 0 <= lam <= 1:
            raise ValueError(f"Reward option `lam` (λ) is {lam!r}; it must lie in [0, 1].")
        self.lam = lam
        self.identifier = identifier
        self.encoder = dual_encoder(model, device, precision)
        self.references = ReferenceEmbeddings(references, self.encoder.image_features)

    def similarities(self, images: torch.Tensor, prompts, metadata: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``S_I`` and ``S_T`` per image, both in [0, 1]."""
        features = self.encoder.image_features(images)
        subject = ((features @ self.references(metadata).T + 1) / 2).mean(dim=1)
        texts = [remove_identifier(text, self.identifier) for text in metadata.get("original_prompts", prompts)]
        alignment = ((features * self.encoder.text_features(texts)).sum(dim=-1) + 1) / 2
        return subject, alignment

    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        subject, alignment = self.similarities(images, prompts, metadata)
        return lambda_harmonic(subject, alignment, self.lam).cpu()
