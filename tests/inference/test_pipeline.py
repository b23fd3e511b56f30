"""ParrotPipeline against diffusers' StableDiffusionPipeline and its own contracts."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ..helpers import SIZE, STEPS, load, seeded


def reference_images(path, prompt, guidance_scale, negative_prompt=None, seed=0):
    sd = StableDiffusionPipeline.from_pretrained(path)
    sd.set_progress_bar_config(disable=True)
    return sd(
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        generator=seeded(seed),
        output_type="np",
    ).images


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_vpred"])
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_without_expansion_equals_stable_diffusion(request, fixture, guidance_scale):
    path = request.getfixturevalue(fixture)
    expected = reference_images(path, ["a cat", "a red fox"], guidance_scale, negative_prompt=["blurry", "dark"])
    pipe = load(path)
    out = pipe(
        ["a cat", "a red fox"],
        negative_prompt=["blurry", "dark"],
        guidance_scale=guidance_scale,
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="np",
    )
    assert out.expanded_prompts is None
    np.testing.assert_array_equal(out.images, expected)


def test_w2_zero_equals_stable_diffusion_even_with_expander_and_expansion(tiny_sd, tiny_expander_dir):
    expected = reference_images(tiny_sd, "a cat", 7.5)
    pipe = load(tiny_sd)
    pipe.load_expander(tiny_expander_dir)
    out = pipe(
        "a cat",
        expanded_prompt="a cat, highly detailed",
        guidance_scale=7.5,
        expansion_guidance_scale=0.0,
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="np",
    )
    np.testing.assert_array_equal(out.images, expected)
    assert out.expanded_prompts is None


def test_expansion_changes_images_and_reports_expanded_text(tiny_sd):
    pipe = load(tiny_sd)
    plain = pipe("a cat", num_inference_steps=STEPS, generator=seeded(), output_type="np").images
    out = pipe(
        "a cat", expanded_prompt="a cute cat, oil painting", num_inference_steps=STEPS, generator=seeded(),
        output_type="np",
    )  # fmt: skip
    assert out.expanded_prompts == ["a cute cat, oil painting"]
    assert np.abs(out.images - plain).max() > 1e-3


def test_batched_prompts_equal_one_by_one(tiny_sd):
    pipe = load(tiny_sd)
    prompts = ["a cat", "a castle on a hill at sunset"]
    expansions = ["a cat, highly detailed", "a castle, cinematic lighting, 4k"]
    batched = pipe(
        prompts,
        expanded_prompt=expansions,
        negative_prompt=["blurry", "dark"],
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        generator=[seeded(s) for s in range(4)],
        output_type="np",
    )
    for index, (prompt, expansion, negative) in enumerate(zip(prompts, expansions, ["blurry", "dark"])):
        single = pipe(
            prompt,
            expanded_prompt=expansion,
            negative_prompt=negative,
            num_images_per_prompt=2,
            num_inference_steps=STEPS,
            generator=[seeded(2 * index), seeded(2 * index + 1)],
            output_type="np",
        )
        np.testing.assert_allclose(batched.images[2 * index : 2 * index + 2], single.images, atol=1e-6)
        assert single.expanded_prompts == [batched.expanded_prompts[index]]


def test_same_seed_same_expansion_and_images(tiny_sd, tiny_expander_dir):
    pipe = load(tiny_sd)
    pipe.load_expander(tiny_expander_dir)
    first = pipe(["a cat", "a dog"], num_inference_steps=STEPS, generator=seeded(3), output_type="np")
    again = pipe(["a cat", "a dog"], num_inference_steps=STEPS, generator=seeded(3), output_type="np")
    other = pipe(["a cat", "a dog"], num_inference_steps=STEPS, generator=seeded(4), output_type="np")
    assert first.expanded_prompts == again.expanded_prompts
    assert all(text.strip() for text in first.expanded_prompts)
    np.testing.assert_array_equal(first.images, again.images)
    assert other.expanded_prompts != first.expanded_prompts


def test_expanded_branch_is_exactly_the_expansion_with_no_identifiers(tiny_sd):
    pipe = load(tiny_sd)
    out = pipe("a cat", expanded_prompt="a fluffy cat", reward_identifiers=[], num_inference_steps=1, output_type="latent")
    assert out.expanded_prompts == ["a fluffy cat"]


def test_callback_reads_and_replaces_latents(tiny_sd):
    pipe = load(tiny_sd)
    observed = []

    def zero_latents_at_last_step(pipeline, step, timestep, tensors):
        observed.append(tensors["latents"].clone())
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    out = pipe(
        "a cat", expanded_prompt="a cat, 4k", num_inference_steps=STEPS, generator=seeded(),
        output_type="latent", callback_on_step_end=zero_latents_at_last_step,
    )  # fmt: skip
    assert len(observed) == STEPS and observed[0].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert torch.count_nonzero(out.images) == 0


def test_callback_sees_all_three_branches_of_prompt_embeds(tiny_sd):
    pipe = load(tiny_sd)
    shapes = []
    pipe(
        ["a cat", "a dog"], expanded_prompt="detailed", num_inference_steps=1, output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: shapes.append(kw["prompt_embeds"].shape) or {},
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )  # fmt: skip
    assert shapes[0][0] == 6


def test_return_tuple(tiny_sd):
    pipe = load(tiny_sd)
    images, nsfw, expanded = pipe("a cat", expanded_prompt="x", num_inference_steps=1, return_dict=False)
    assert len(images) == 1 and nsfw is None and expanded == ["x"]
