"""A tiny ALIGN with RANDOM weights, for offline runs that exercise RPO's λ-harmonic reward (the RPO quickstart).

Its similarities are those of random features: they make a run go through every step of the method, not judge
images. Built once into the cache folder (``$PARROT_PIPELINE_CACHE``) and loaded with ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AlignConfig, AlignModel, AlignProcessor, BertTokenizer

from parrot_pipeline.tiny import TINY_VERSION, WORDS, _build_once, cache_dir

from .clip import TransformersClipModel


def tiny_align(seed: int = 0) -> tuple[AlignModel, AlignProcessor]:
    """An ALIGN (EfficientNet image tower, BERT text tower) with a word-level BERT vocabulary and ALIGN's processor."""
    # imported when a tiny ALIGN is built: importing the rewards then works with transformers 4 too (TRL's
    # benchmark environment), which lacks the PIL processor classes
    from transformers import EfficientNetImageProcessorPil

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    vocab = {token: index for index, token in enumerate(tokens)}
    torch.manual_seed(seed)
    # two EfficientNet stages; the last one's 32 channels are the image embedding, so projection_dim is 32 too
    vision = dict(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=[3, 3],
                  in_channels=[32, 16], out_channels=[16, 32], strides=[1, 2], num_block_repeats=[1, 1],
                  expand_ratios=[1, 6], hidden_dim=64)  # fmt: skip
    text = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model = AlignModel(AlignConfig(text_config=text, vision_config=vision, projection_dim=32))
    # kakaobrain/align-base's settings (resize 346, crop 289, pixels to [-1, 1]) scaled to a 32 px input
    images = EfficientNetImageProcessorPil(
        size={"height": 38, "width": 38}, crop_size={"height": 32, "width": 32}, do_center_crop=True, resample=2,
        do_normalize=False, rescale_factor=1 / 127.5, rescale_offset=True, include_top=False,
    )  # fmt: skip
    return model, AlignProcessor(image_processor=images, tokenizer=BertTokenizer(vocab=vocab))


def default_tiny_align() -> Path:
    """The tiny ALIGN's folder, built once."""

    def build(folder: Path) -> None:
        model, processor = tiny_align()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return _build_once(cache_dir() / f"tiny-align-{TINY_VERSION}", build)


class TinyAlign(TransformersClipModel):
    """The tiny random ALIGN as a dual encoder (reward option ``model: tiny``), built on first use."""

    def __init__(self, device: str | None = None, precision: str = "fp32"):
        super().__init__("tiny", device=device, precision=precision)

    def load(self) -> None:
        if self.model is None:
            self.name = self.processor_name = str(default_tiny_align())
        super().load()
