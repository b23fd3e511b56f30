"""Reference images of one subject, for the subject-fidelity rewards (``lambda_harmonic``, ``dino_similarity``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps
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


def read_image(path: Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; a file that is not a complete image fails, named."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: a truncated file fails here, not later
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for unknown formats and truncated data
        raise ValueError(f"{path}: not a readable image ({type(error).__name__}: {error}).") from None


def read_subject_images(folder: str | Path, what: str) -> list[Image.Image]:
    """Every image of a subject's folder, decoded (EXIF orientation applied). The folder must hold images only
    (hidden files aside): anything else, or an image that does not decode completely, is an error naming the file.
    ``what`` names the setting in the messages (e.g. "config `references`")."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{what}: {str(folder)!r} is not a folder.")
    files = sorted(file for file in path.iterdir() if not file.name.startswith("."))
    if not files:
        raise ValueError(f"{what}: {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    for file in files:
        if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{what}: {file} is not an image file; the folder must hold only the subject's images "
                f"({', '.join(IMAGE_SUFFIXES)})."
            )
    return [read_image(file) for file in files]


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
            images = [pil_to_tensor(read_image(file)).float() / 255 for file in self.files]
            self.folder_embeddings = torch.cat([self.encode(image[None]) for image in images])
        return self.folder_embeddings
