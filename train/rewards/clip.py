"""The vision–language models the learned rewards share, and the CLIP alignment reward (CLIPScore).

Models load lazily, on a reward's first call, from a Hub id or a local path; offline, a model that is not cached
fails with a message naming the id and the option that takes a local copy instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoModel, AutoProcessor

from . import register

# OpenAI's CLIP in open_clip's Hub layout: ViT-B/32 (the Parrot paper's text–image alignment reward) and ViT-L/14
# (the LAION aesthetic predictor's backbone).
DEFAULT_CLIP_MODEL = "hf-hub:timm/vit_base_patch32_clip_224.openai"
OPENAI_VIT_L_14 = "hf-hub:timm/vit_large_patch14_clip_224.openai"

OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names that bring their own weights
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images [N, 3, H, W] in [0, 1] as 8-bit PIL images, what the models' own preprocessing expects."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(array)) for array in arrays]


def pick_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"Reward option `precision` is {precision!r}; allowed: {sorted(PRECISIONS)}.")
    return PRECISIONS[precision]


def hub_location(spec: str, option: str) -> tuple[str, str] | None:
    """``(repo_id, filename)`` for ``hf-hub:owner/repo/path/in/repo``; ``None`` for a local file, which must exist.
    Rewards call it when built, so a wrong option fails with the config check, before any model loads."""
    if not spec.startswith("hf-hub:"):
        if not Path(spec).is_file():
            raise FileNotFoundError(
                f"Reward option `{option}`: no file {spec!r}; give a local file or 'hf-hub:owner/repo/filename'."
            )
        return None
    parts = spec.removeprefix("hf-hub:").split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"Reward option `{option}` is {spec!r}; a file on the Hub is 'hf-hub:owner/repo/filename'.")
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_file(spec: str, option: str) -> str:
    """The local path of ``spec`` (see ``hub_location``), downloading a Hub file once into the Hugging Face cache."""
    location = hub_location(spec, option)
    if location is None:
        return spec
    repo_id, filename = location
    try:
        return hf_hub_download(repo_id, filename)
    except OSError as error:
        raise OSError(
            f"Could not get {spec!r} ({type(error).__name__}: {error}). Offline, download it once where the Hub is "
            f"reachable (`hf download {repo_id} {filename}`) and give the local file: "
            f"reward_options: {{<reward>: {{{option}: /path/to/{Path(filename).name}}}}}."
        ) from error


def load_pretrained(loader, name: str, option: str, **kwargs):
    """``loader.from_pretrained(name)`` for a transformers model or processor; a failure names the id and the way
    to use a local folder instead."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as error:
        raise OSError(
            f"Could not load {name!r} ({type(error).__name__}: {error}). Offline, download it once where the Hub is "
            f"reachable (`hf download {name} --local-dir DIR`) and point the reward at the folder: "
            f"reward_options: {{<reward>: {{{option}: DIR}}}}."
        ) from error


class DualEncoder:
    """What the CLIP-style wrappers share: a model loaded on first use, and L2-normalised float32 embeddings of
    images and texts, computed without gradients. Subclasses load the model and encode 8-bit PIL images and texts."""

    def __init__(self, device: str | None, precision: str):
        self.device = pick_device(device)
        self.precision = precision
        self.dtype = torch_dtype(precision)
        self.model = None

    def load(self) -> None:
        raise NotImplementedError

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        self.load()
        return self.model.logit_scale.exp().float()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        self.load()
        return torch.nn.functional.normalize(self.encode_images(to_pil(images)).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        self.load()
        return torch.nn.functional.normalize(self.encode_texts(list(texts)).float(), dim=-1)


class OpenClipModel(DualEncoder):
    """An open_clip model, tokenizer and preprocessing.

    ``model`` is an open_clip name: ``hf-hub:owner/repo`` or ``local-dir:/path`` (a folder holding
    ``open_clip_config.json`` and the weights, as on the Hub); or a built-in architecture such as ``ViT-H-14`` with
    its weights in ``checkpoint`` (a state-dict file, local or ``hf-hub:owner/repo/file``), which open_clip loads
    itself. ``resize_mode`` overrides the preprocessing's resize (open_clip's ``shortest``, ``longest``, ``squash``).
    """

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str | None = None, precision: str = "fp32",
                 checkpoint: str | None = None, resize_mode: str | None = None):  # fmt: skip
        super().__init__(device, precision)
        self.name = model
        self.checkpoint = checkpoint
        if checkpoint is not None:
            hub_location(checkpoint, "checkpoint")
            if model.startswith(OPEN_CLIP_SCHEMAS):
                raise ValueError(
                    f"Reward option `checkpoint` needs `model` to be a built-in open_clip architecture such as "
                    f"'ViT-H-14' (see open_clip.list_models()), not {model!r}, which brings its own weights."
                )
        self.resize_mode = resize_mode
        self.preprocess = self.tokenizer = None

    def load(self) -> None:
        if self.model is not None:
            return
        checkpoint = hub_file(self.checkpoint, "checkpoint") if self.checkpoint is not None else None
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                self.name, pretrained=checkpoint, device=self.device, precision=self.precision,
                image_resize_mode=self.resize_mode,
            )  # fmt: skip
            self.tokenizer = open_clip.get_tokenizer(self.name)
        except (OSError, RuntimeError, ValueError) as error:
            if checkpoint is not None:  # already local: the file does not fit the architecture
                raise ValueError(
                    f"Could not load the checkpoint {self.checkpoint!r} into the open_clip architecture "
                    f"{self.name!r}: {error}"
                ) from None
            raise OSError(
                f"Could not load the open_clip model {self.name!r} ({type(error).__name__}: {error}). Offline, "
                "download it once where the Hub is reachable and point the reward at the folder with "
                "reward_options: {<reward>: {model: 'local-dir:/path/to/folder'}}."
            ) from error
        self.model = model.eval()

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class TransformersClipModel(DualEncoder):
    """A CLIP-style dual encoder from transformers (CLIP, ALIGN, …) and its processor.

    ``model`` is a Hub id or a folder written by ``save_pretrained``; ``processor`` is where the processor lives when
    the model repo lacks one (PickScore uses LAION's). Images go through the processor's PIL backend, the one the
    public models were evaluated with.
    """

    def __init__(self, model: str, processor: str | None = None, device: str | None = None, precision: str = "fp32"):
        super().__init__(device, precision)
        self.name = model
        self.processor_name = processor or model
        self.processor = None

    def load(self) -> None:
        if self.model is not None:
            return
        self.processor = load_pretrained(
            AutoProcessor, self.processor_name, "processor" if self.processor_name != self.name else "model",
            backend="pil",
        )  # fmt: skip
        self.model = load_pretrained(AutoModel, self.name, "model", dtype=self.dtype).to(self.device).eval()

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        return self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        return self.model.get_text_features(**tokens.to(self.device)).pooler_output


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
