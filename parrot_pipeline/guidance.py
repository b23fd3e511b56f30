"""Original-prompt-centred guidance: the one implementation used by the pipeline, the nodes and training."""

from __future__ import annotations

import torch


def parrot_guidance(
    noise_uncond: torch.Tensor,
    noise_original: torch.Tensor,
    noise_expanded: torch.Tensor | None,
    guidance_scale: float,
    expansion_guidance_scale: float,
) -> torch.Tensor:
    """Combine the branch predictions of one denoising step.

    ``ε∅ + w1·(ε(c) − ε∅) + w2·(ε(ĉ) − ε∅)`` with ``w1 = guidance_scale`` on the user's prompt ``c`` and
    ``w2 = expansion_guidance_scale`` on the expanded prompt ``ĉ``. ``noise_uncond`` is the negative-prompt branch
    when a negative prompt is used. With ``noise_expanded=None`` this is classifier-free guidance, computed in the
    same order as diffusers' ``StableDiffusionPipeline`` so both give bit-identical results.
    """
    guided = noise_uncond + guidance_scale * (noise_original - noise_uncond)
    if noise_expanded is not None:
        guided = guided + expansion_guidance_scale * (noise_expanded - noise_uncond)
    return guided
