"""Image sentiment by zero-shot CLIP: the public stand-in for the emotion classifier the Parrot paper used."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import register
from .clip import OPENAI_VIT_L_14, OpenClipModel

# Mikels' eight emotion categories, those of the image-emotion datasets (FI, Emotion6) classifiers are trained on.
POSITIVE = ("amusement", "awe", "contentment", "excitement")
NEGATIVE = ("anger", "disgust", "fear", "sadness")
TEMPLATES = ("a photo that evokes {}.", "an image that makes people feel {}.", "a picture full of {}.")


@register("sentiment", value_range="[0, 1] probability of a positive emotion", description="zero-shot CLIP sentiment")
class Sentiment:
    """Probability mass on the positive emotions of a zero-shot CLIP classifier over ``positive + negative``.

    Each emotion's text embedding is the normalised mean of its ``templates`` (``{}`` is the emotion), as in CLIP's
    zero-shot prompt ensembling; class probabilities are ``softmax(logit_scale · cos(image, emotion))``.
    """

    def __init__(self, model: str = OPENAI_VIT_L_14, positive: Sequence[str] = POSITIVE,
                 negative: Sequence[str] = NEGATIVE, templates: Sequence[str] = TEMPLATES, device: str | None = None,
                 precision: str = "fp32"):  # fmt: skip
        for option, words in (("positive", positive), ("negative", negative), ("templates", templates)):
            if isinstance(words, str) or not words or not all(isinstance(word, str) and word for word in words):
                raise ValueError(f"Reward option `{option}` is {words!r}; give a non-empty list of strings.")
        bad = [template for template in templates if template.count("{}") != 1]
        if bad:
            raise ValueError(f"Reward option `templates`: {bad!r} must each hold one '{{}}' for the emotion.")
        self.clip = OpenClipModel(model, device, precision)
        self.emotions = [*positive, *negative]
        self.num_positive = len(positive)
        self.templates = list(templates)
        self.emotion_features = None

    def __call__(self, images: torch.Tensor, prompts, metadata: dict) -> torch.Tensor:
        if self.emotion_features is None:
            texts = [template.format(emotion) for emotion in self.emotions for template in self.templates]
            features = self.clip.text_features(texts).view(len(self.emotions), len(self.templates), -1).mean(dim=1)
            self.emotion_features = torch.nn.functional.normalize(features, dim=-1)
        logits = self.clip.logit_scale * self.clip.image_features(images) @ self.emotion_features.T
        return logits.softmax(dim=-1)[:, : self.num_positive].sum(dim=-1).cpu()
