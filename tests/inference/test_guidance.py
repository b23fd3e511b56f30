"""The guidance formula, alone and inside the pipeline, against hand computations."""

import numpy as np
import torch

from parrot_pipeline import parrot_guidance
from parrot_pipeline.guidance import parrot_guidance as guidance_in_module

from ..helpers import SIZE, load, seeded


def test_formula_matches_both_written_forms():
    generator = torch.Generator().manual_seed(0)
    uncond, original, expanded = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    w1, w2 = 5.0, 3.0
    result = parrot_guidance(uncond, original, expanded, w1, w2)
    assert torch.allclose(result, uncond + w1 * (original - uncond) + w2 * (expanded - uncond))
    assert torch.allclose(result, w1 * original + (1 - w1 - w2) * uncond + w2 * expanded)
    assert guidance_in_module is parrot_guidance


def test_formula_without_expanded_branch_is_cfg_and_w2_zero_is_cfg():
    uncond, original, expanded = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([10.0])
    assert parrot_guidance(uncond, original, None, 7.5, 5.0).item() == 1.0 + 7.5 * 2.0
    assert parrot_guidance(uncond, original, expanded, 7.5, 0.0).item() == 1.0 + 7.5 * 2.0


class RecordingUNet(torch.nn.Module):
    """A stub noise predictor: a fixed function of latents and text embeddings; records every call."""

    def __init__(self, unet):
        super().__init__()
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        noise = torch.sin(sample * 3.0) + text * torch.arange(sample.shape[1]).view(1, -1, 1, 1)
        self.calls.append((sample.shape[0], noise))
        return (noise,)


def test_pipeline_step_is_the_formula_on_one_batched_call(tiny_sd):
    pipe = load(tiny_sd)
    stub = RecordingUNet(pipe.unet)
    pipe.unet = stub
    seen = []
    pipe(
        ["a cat", "a dog"],
        negative_prompt=["blurry", "dark"],
        expanded_prompt=["a cat, highly detailed", "a dog, cinematic"],
        guidance_scale=4.0,
        expansion_guidance_scale=2.5,
        num_inference_steps=3,
        generator=seeded(),
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {},
    )
    assert len(stub.calls) == 3 and all(batch == 6 for batch, _ in stub.calls), "one call per step, 3 branches × 2"

    # Replay the scheduler with the hand-written formula on the recorded branch outputs.
    pipe.scheduler.set_timesteps(3)
    latents = pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", seeded())
    for (_, noise), t, observed in zip(stub.calls, pipe.scheduler.timesteps, seen):
        uncond, original, expanded = noise.chunk(3)
        guided = 4.0 * original + (1 - 4.0 - 2.5) * uncond + 2.5 * expanded
        latents = pipe.scheduler.step(guided, t, latents).prev_sample
        torch.testing.assert_close(observed, latents, rtol=1e-5, atol=1e-5)


def test_w1_weighs_the_original_prompt_and_w2_the_expansion(tiny_sd):
    """Each scale on its own branch, through the real UNet: with w1 = 0 the step is classifier-free guidance on ĉ
    alone, with w2 = 0 on c alone (a pipeline that swapped the branches fails both)."""
    from diffusers import StableDiffusionPipeline

    pipe = load(tiny_sd)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd)
    stock.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "output_type": "np", "height": SIZE, "width": SIZE}
    original, expanded = "a cat", "a dog by the sea, highly detailed"
    only_expanded = pipe(original, expanded_prompt=expanded, guidance_scale=0.0, expansion_guidance_scale=4.0,
                         generator=seeded(), **kwargs).images  # fmt: skip
    only_original = pipe(original, expanded_prompt=expanded, guidance_scale=4.0, expansion_guidance_scale=0.0,
                         generator=seeded(), **kwargs).images  # fmt: skip
    cfg_on_expanded = stock(expanded, guidance_scale=4.0, generator=seeded(), **kwargs).images
    cfg_on_original = stock(original, guidance_scale=4.0, generator=seeded(), **kwargs).images
    assert np.abs(cfg_on_expanded - cfg_on_original).max() > 1e-2, "the two prompts give different images"
    np.testing.assert_allclose(only_expanded, cfg_on_expanded, atol=1e-5)
    np.testing.assert_allclose(only_original, cfg_on_original, atol=1e-5)
