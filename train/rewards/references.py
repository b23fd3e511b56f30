"""Reference images of one subject, for the subject-fidelity rewards (``lambda_harmonic``, ``dino_similarity``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")


def reference_files(folder: str) -> list[Path]:
    path = Path(folder)
    files = sorted(file for file in path.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"Reward option `references`: {folder!r} is not a folder holding images ({', '.join(IMAGE_SUFFIXES)})."
        )
    return files


class ReferenceEmbeddings:
    """Embeddings ``[M, D]`` of the reference images: ``metadata["reference_images"]`` when a call passes them (a
    ``[M, 3, H, W]`` tensor in [0, 1], or a list of ``[3, H, W]`` tensors of any sizes), else the images in the
    ``references`` folder, read and embedded once. ``encode`` maps images ``[N, 3, H, W]`` to embeddings."""

    def __init__(self, folder: str | None, encode: Callable[[torch.Tensor], torch.Tensor]):
        self.files = reference_files(folder) if folder is not None else None
        self.encode = encode
        self.folder_embeddings = None

    def __call__(self, metadata: dict) -> torch.Tensor:
        if "reference_images" in metadata:
            return torch.cat([self.encode(image[None]) for image in metadata["reference_images"]])
        if self.files is None:
            raise ValueError(
                "This reward compares images with reference images of the subject: set the reward option "
                "`references` to a folder of images, or pass metadata['reference_images'] ([M, 3, H, W] in [0, 1])."
            )
        if self.folder_embeddings is None:
            images = [pil_to_tensor(Image.open(file).convert("RGB")).float() / 255 for file in self.files]
            self.folder_embeddings = torch.cat([self.encode(image[None]) for image in images])
        return self.folder_embeddings
