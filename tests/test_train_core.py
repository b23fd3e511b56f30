"""Training building blocks: the DDIM policy log-prob, Pareto selection, hypervolume, rewards, losses, config."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from peft import LoraConfig

from train.config import load_config
from train.pareto import hypervolume, non_dominated_mask
from train.parrot import policy_loss
from train.rewards import resolve_reward, score_images
from train.sampling import (
    adapters_disabled,
    ddim_step_with_log_prob,
    encode_prompts,
    guided_noise,
    recompute_log_prob,
    sample_trajectories,
)

from .helpers import load


def brute_force_front(rewards: torch.Tensor) -> torch.Tensor:
    keep = []
    for b in range(len(rewards)):
        if not torch.isfinite(rewards[b]).all():
            keep.append(False)
            continue
        dominated = any(
            torch.isfinite(rewards[a]).all() and (rewards[a] >= rewards[b]).all() and (rewards[a] > rewards[b]).any()
            for a in range(len(rewards))
            if a != b
        )
        keep.append(not dominated)
    return torch.tensor(keep)


def test_non_dominated_mask_matches_the_definition_with_ties_and_nan():
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        rewards = torch.randint(0, 4, (24, 3), generator=generator).float()  # small integers: many ties
        rewards[torch.rand(24, generator=generator) < 0.15, torch.randint(0, 3, (1,), generator=generator)] = math.nan
        assert torch.equal(non_dominated_mask(rewards), brute_force_front(rewards))


def test_nan_row_never_selected_and_never_dominates():
    rewards = torch.tensor([[math.nan, 100.0], [1.0, 1.0], [0.0, 2.0]])
    assert non_dominated_mask(rewards).tolist() == [False, True, True]
    assert non_dominated_mask(torch.tensor([[1.0, 1.0], [1.0, 1.0]])).tolist() == [True, True], "equal rows both stay"


def test_hypervolume_exact_cases_and_against_monte_carlo():
    assert hypervolume(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.zeros(2)) == pytest.approx(3.0)
    assert hypervolume(torch.tensor([[1.0, 1.0, 1.0]]), torch.zeros(3)) == pytest.approx(1.0)
    assert hypervolume(torch.tensor([[-1.0, 5.0]]), torch.zeros(2)) == 0.0
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(12, 3, generator=generator)
    samples = torch.rand(200_000, 3, generator=generator)
    covered = (samples[:, None, :] <= points[None]).all(dim=2).any(dim=1).double().mean().item()
    assert hypervolume(points, torch.zeros(3)) == pytest.approx(covered, abs=0.005)


def test_ddim_log_prob_is_the_closed_form_gaussian_density():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    eta, t = 0.7, int(scheduler.timesteps[3])
    prev_t = t - 100
    a_t, a_prev = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[prev_t].double()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    x0 = (sample.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps.double()

    prev_sample, log_prob = ddim_step_with_log_prob(scheduler, eps, t, sample, eta, generator=generator)
    expected = (-((prev_sample.double() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(log_prob.double(), expected.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # scoring a given step returns the same density
    _, again = ddim_step_with_log_prob(scheduler, eps, t, sample, eta, prev_sample=prev_sample)
    torch.testing.assert_close(again, log_prob)


@pytest.fixture(scope="module")
def lora_pipe(tiny_sd):
    pipe = load(tiny_sd)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    return pipe


def sample(pipe, prompts=("a cat", "a dog", "a fox"), seed=0):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    embeds, negative = encode_prompts(pipe, list(prompts))
    trajectories = sample_trajectories(
        pipe, scheduler, embeds, negative, num_inference_steps=5, guidance_scale=5.0, eta=1.0,
        height=64, width=64, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return scheduler, trajectories


def test_recomputed_log_prob_equals_the_sampled_one_with_a_fresh_lora(lora_pipe):
    scheduler, trajectories = sample(lora_pipe)
    assert trajectories.latents.shape == (3, 6, 4, 8, 8) and trajectories.log_probs.shape == (3, 5)
    for step in range(5):
        log_prob, _ = recompute_log_prob(lora_pipe.unet, scheduler, trajectories, step, guidance_scale=5.0, eta=1.0)
        ratio = torch.exp(log_prob - trajectories.log_probs[:, step])
        torch.testing.assert_close(ratio, torch.ones(3), rtol=0, atol=1e-5)
        assert log_prob.requires_grad


def test_fresh_lora_has_zero_kl_and_the_reference_is_the_adapter_off(lora_pipe):
    scheduler, trajectories = sample(lora_pipe)
    latents, t = trajectories.latents[:, 2], trajectories.timesteps[2]
    args = (scheduler, latents, t, trajectories.prompt_embeds, trajectories.negative_embeds, 5.0)
    with torch.no_grad():
        policy = guided_noise(lora_pipe.unet, *args)
        with adapters_disabled(lora_pipe.unet):
            reference = guided_noise(lora_pipe.unet, *args)
    assert torch.equal(policy, reference), "gaussian-initialised LoRA has B = 0"


def test_policy_loss_and_ppo_clipping_bounds_the_update():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.95, 0.5, 1.05])).requires_grad_()
    policy_loss(new, old, advantages, clip_range=0.1).sum().backward()
    # ratio 1.5 with A>0 and ratio 0.5 with A<0 are outside the trust region: no gradient pushes them further
    assert new.grad[0] == 0 and new.grad[2] == 0
    assert new.grad[1] == pytest.approx(-0.95) and new.grad[3] == pytest.approx(1.05)
    unclipped = torch.zeros(4, requires_grad=True)
    policy_loss(unclipped, old, advantages, clip_range=None).sum().backward()
    assert unclipped.grad.tolist() == [-1.0, -1.0, 1.0, 1.0], "REINFORCE: −A·∇log p at ratio 1"


def test_weight_free_rewards_on_constructed_images():
    flat_grey = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    images = torch.cat([flat_grey, noise, red])
    names = ["jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "sharpness"]
    scores = score_images({name: resolve_reward(name) for name in names}, images, ["x"] * 3, {})
    compress, colour, sharp = (scores[:, names.index(n)] for n in ("jpeg_compressibility", "colorfulness", "sharpness"))
    assert compress[0] > compress[1] and torch.equal(scores[:, names.index("jpeg_incompressibility")], -compress)
    assert colour[0] == 0 and colour[2] == pytest.approx(0.3 * math.sqrt(255**2 + 127.5**2))
    assert sharp[0] == 0 and sharp[1] > 0.1


def test_reward_errors_name_the_reward():
    with pytest.raises(ValueError, match="returned shape"):
        score_images({"broken": lambda images, prompts, metadata: torch.zeros(2, 2)}, torch.rand(2, 3, 8, 8), ["a"] * 2, {})
    with pytest.raises(ValueError, match="Did you mean 'colorfulness'"):
        resolve_reward("colourfulness")
    assert resolve_reward("train.rewards.image_stats:sharpness") is resolve_reward("sharpness")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["learning_rte=1e-4"], ValueError, "Did you mean `learning_rate`"),
        (["learning_rate=0"], ValueError, "`learning_rate`"),
        (["eta=0"], ValueError, "eta > 0"),
        (["iterations=1.5"], TypeError, "`iterations` must be int"),
        (["rewards=[]"], ValueError, "at least one reward"),
        (["mode=ppo"], ValueError, "`mode`"),
        (["rewards=[colorfulness, aesthetik]"], ValueError, "Unknown reward 'aesthetik'"),
        (["rewards=[colorfulness]"], ValueError, "at least two rewards in parrot mode"),
        (["overwrite=yes please"], TypeError, "`overwrite` must be bool"),
        (["overwrite=yes"], TypeError, "`overwrite` must be bool"),  # YAML 1.2 booleans: true or false
        (["device=gpu"], ValueError, "`device`"),
        (["accumulate_timesteps=true"], ValueError, "`accumulate_timesteps` is gone: .*gradient_accumulation_steps"),
        (["gradient_accumulation_steps=0"], ValueError, "`gradient_accumulation_steps`"),
        (["num_inner_epochs=0"], ValueError, "`num_inner_epochs`"),
        (["cpu_threads=0"], ValueError, "`cpu_threads`"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(overrides, error, message):
    with pytest.raises(error, match=message):
        load_config("configs/quickstart.yaml", overrides)


def test_string_settings_keep_yaml_1_1_boolean_words(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("mixed_precision: no\nresume: true\n")
    config = load_config(preset, ["eval_every=0"])
    assert (config.mixed_precision, config.resume) == ("no", True)
    assert load_config(None, ["mixed_precision=no", "overwrite=false"]).mixed_precision == "no"


def test_presets_load():
    for name in ("quickstart", "parrot_sd15", "dpok_sd15", "ddpo_sd15"):
        config = load_config(f"configs/{name}.yaml")
        assert config.mode in ("parrot", "dpok", "ddpo")
    paper = load_config("configs/parrot_sd15.yaml")
    assert (paper.lora_targets, paper.num_inference_steps, paper.learning_rate) == ("cross_attention", 50, 1e-5)
    assert paper.rewards == ["aesthetic", "clip_score", "pickscore", "sentiment"], "the paper's four rewards"
    assert paper.images_per_prompt * len(paper.rewards) == 256 and paper.advantage == "raw"
    assert paper.gradient_accumulation_steps is None and paper.num_inner_epochs == 1, "one optimiser step per batch"
    assert (paper.expander_model, paper.expander_template) == ("microsoft/Promptist", "{prompt} Rephrase:")
    dpok = load_config("configs/dpok_sd15.yaml")
    assert (dpok.reward_scale, dpok.kl_beta, dpok.clip_range) == (1000.0, 0.1, 1e-4), "DPOK's α, β and ratio clamp"
    ddpo = load_config("configs/ddpo_sd15.yaml")
    assert ddpo.images_per_prompt // ddpo.train_batch_size // ddpo.gradient_accumulation_steps == 4, "optimiser steps"


def test_dpok_clamps_the_ratio_and_stops_its_gradient_on_both_sides():
    advantages = torch.tensor([1.0, 1.0, -1.0])
    new = torch.log(torch.tensor([1.5, 0.5, 1.5])).requires_grad_()
    loss = policy_loss(new, torch.zeros(3), advantages, clip_range=0.1, clamp_ratio=True)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.1, -0.9, 1.1]))
    loss.sum().backward()
    assert new.grad.tolist() == [0.0, 0.0, 0.0], "PPO's form would push the ratio 0.5 with A > 0 back up"
