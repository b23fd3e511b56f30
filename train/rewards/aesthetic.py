"""LAION's improved aesthetic predictor v2: a CLIP ViT-L/14 image embedding, L2-normalised, into a small MLP head."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from . import register
from .clip import OPENAI_VIT_L_14, OpenClipModel, hub_file, hub_location

# sac+logos+ava1-l14-linearMSE.pth, the head LAION-Aesthetics was filtered with, as TRL's DDPO example hosts it.
DEFAULT_HEAD = "hf-hub:trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


class AestheticHead(nn.Module):
    """The predictor's MLP in its state-dict layout (``layers.0`` … ``layers.7``): linear layers with dropout between
    and no activation, as it was trained."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head(path: str) -> AestheticHead:
    """Read the head from safetensors, or from the legacy ``.pth`` with ``weights_only=True`` (tensors only, no
    pickled code runs)."""
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
    except (KeyError, RuntimeError) as error:
        raise ValueError(
            f"Aesthetic head {path!r} is not in the predictor's layout (layers.0, 2, 4, 6, 7 of "
            f"768→1024→128→64→16→1): {error!r}"
        ) from None
    return head.eval()


@register("aesthetic", value_range="about 1–10 (AVA scale); SD 1.5 images mostly 5–6.5",
          description="LAION aesthetic predictor v2")  # fmt: skip
class Aesthetic:
    """Predicted aesthetic rating: ``head(normalize(clip_image_embedding))``. ``model`` is the open_clip backbone
    (OpenAI ViT-L/14), ``head`` the MLP: a ``.pth`` / ``.safetensors`` file or ``hf-hub:owner/repo/file``."""

    def __init__(self, model: str = OPENAI_VIT_L_14, head: str = DEFAULT_HEAD, device: str | None = None,
                 precision: str = "fp32"):  # fmt: skip
        hub_location(head, "head")
        self.clip = OpenClipModel(model, device, precision)
        self.head_file = head
        self.head = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        if self.head is None:
            self.head = load_head(hub_file(self.head_file, "head")).to(self.clip.device)
        return self.head(self.clip.image_features(images)).cpu()
