"""Diffusion sampling as a policy: DDIM trajectories with per-step log-probabilities, and their recomputation.

Each DDIM step with ``eta > 0`` is a Gaussian ``x_{t-1} ~ N(μ_θ(x_t, t, c), σ_t² I)``; its mean is the arithmetic
of diffusers' ``DDIMScheduler.step`` batched over per-sample timesteps (tested equal to it), and
``σ_t = eta · sqrt(posterior variance)``. The log-probability is the Gaussian log-density **averaged over the
latent elements** (as in the DDPO reference code, which is why PPO clip ranges are small, ~1e-4); sampling and
training use this same function, always in float32. Guidance is part of the policy: the mean is computed from the
classifier-free-guided prediction on the (identifier-prefixed, expanded) prompt, with the project's one guidance
function.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from parrot_pipeline import ParrotPipeline, parrot_guidance

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def ddim_step_mean(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the DDIM step from ``timesteps`` (one per sample, ``[N]``), in float32.

    The arithmetic of diffusers' ``DDIMScheduler.step`` as pipelines call it (epsilon, v-prediction and sample
    prediction, ``clip_sample``), batched over per-sample timesteps, which DDPO's per-sample timestep subsets need
    and ``step`` (one timestep per call) does not take. ``σ_t = eta · sqrt(posterior variance)``.
    """
    config = scheduler.config
    if config.thresholding:
        raise ValueError("The DDIM policy does not support the scheduler's `thresholding`; turn it off in its config.")
    model_output, sample = model_output.float(), sample.float()
    timesteps = timesteps.to(sample.device).long()
    prev_timesteps = timesteps - config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha_prod_t = alphas_cumprod[timesteps].view(shape)
    alpha_prod_t_prev = torch.where(
        prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], scheduler.final_alpha_cumprod.to(sample.device)
    ).view(shape)
    beta_prod_t = 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    elif config.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise ValueError(f"DDIM `prediction_type` {config.prediction_type!r} is not epsilon, sample or v_prediction.")
    if config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance**0.5
    mean = alpha_prod_t_prev**0.5 * pred_original_sample + (1 - alpha_prod_t_prev - std**2) ** 0.5 * pred_epsilon
    return mean, std.flatten()


def ddim_step_with_log_prob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take (or, given ``prev_sample``, score) one DDIM step from ``timesteps`` (``[N]``, or one for all).
    Returns ``(prev_sample, log_prob [N])`` in float32."""
    timesteps = torch.as_tensor(timesteps, device=sample.device).expand(len(sample))
    mean, std = ddim_step_mean(scheduler, model_output, timesteps, sample, eta)
    std = std.view((-1,) + (1,) * (sample.ndim - 1))
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    log_prob = -((prev_sample.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def guided_noise(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free-guided UNet prediction at ``timesteps`` (``[N]``, or one for all), both branches in one
    batched call.

    The input takes the embeddings' dtype, the UNet's as in diffusers' pipelines (diffusers' ``unet.dtype`` walks
    every module, a cost that shows on small models). DDIM's ``scale_model_input`` is the identity.
    """
    timesteps = torch.as_tensor(timesteps, device=latents.device).expand(len(latents))
    model_input = torch.cat([latents, latents]).to(prompt_embeds.dtype)
    output = unet(
        model_input, torch.cat([timesteps, timesteps]), encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])
    ).sample
    uncond, cond = output.chunk(2)
    return parrot_guidance(uncond, cond, None, guidance_scale, 0.0)


@dataclass
class Trajectories:
    """A batch of sampled denoising chains and everything needed to recompute their log-probs."""

    latents: torch.Tensor  # [N, T + 1, C, H, W] float32, x_T … x_0
    log_probs: torch.Tensor  # [N, T] float32, log p(x_{t-1} | x_t) at sampling time
    timesteps: torch.Tensor  # [T]
    prompt_embeds: torch.Tensor  # [N, L, D]
    negative_embeds: torch.Tensor  # [N, L, D]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    @classmethod
    def cat(cls, parts: list[Trajectories]) -> Trajectories:
        """Join batches sampled with the same timesteps."""
        return cls(
            torch.cat([p.latents for p in parts]),
            torch.cat([p.log_probs for p in parts]),
            parts[0].timesteps,
            torch.cat([p.prompt_embeds for p in parts]),
            torch.cat([p.negative_embeds for p in parts]),
        )

    def select(self, index: torch.Tensor) -> Trajectories:
        """The trajectories at ``index`` (bool mask or indices) along the batch dimension."""
        return Trajectories(
            self.latents[index], self.log_probs[index], self.timesteps, self.prompt_embeds[index], self.negative_embeds[index]
        )


def encode_prompts(pipe: ParrotPipeline, prompts: list[str], negative_prompt: str | None = None):
    """Conditional and unconditional text embeddings, with the pipeline's own prompt encoding."""
    return pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, True, [negative_prompt or ""] * len(prompts))


@torch.no_grad()
def sample_trajectories(
    pipe: ParrotPipeline,
    scheduler: DDIMScheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    eta: float,
    height: int,
    width: int,
    generator: torch.Generator,
) -> Trajectories:
    """Sample one trajectory per row of ``prompt_embeds``, storing every latent and step log-prob."""
    device = prompt_embeds.device  # not ``pipe.unet.device``, which walks every module of the UNet
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = pipe.prepare_latents(
        len(prompt_embeds), pipe.unet.config.in_channels, height, width, torch.float32, device, generator
    )
    all_latents, all_log_probs = [latents], []
    for timestep in scheduler.timesteps:
        noise = guided_noise(pipe.unet, scheduler, latents, timestep, prompt_embeds, negative_embeds, guidance_scale)
        latents, log_prob = ddim_step_with_log_prob(scheduler, noise, timestep, latents, eta, generator=generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return Trajectories(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=scheduler.timesteps.clone(),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
    )


def recompute_log_prob(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    trajectories: Trajectories,
    steps: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each trajectory's stored step ``steps[i]`` (x_t → x_{t-1}; ``[N]``, or one for all) under the
    current ``unet``, with gradients.

    Returns ``(log_prob [N], guided noise prediction)``; the prediction feeds DPOK's KL term.
    """
    rows = torch.arange(len(trajectories.latents), device=trajectories.latents.device)
    steps = torch.as_tensor(steps, device=rows.device).expand(len(rows))
    latents = trajectories.latents[rows, steps]
    timesteps = trajectories.timesteps.to(rows.device)[steps]
    noise = guided_noise(
        unet, scheduler, latents, timesteps, trajectories.prompt_embeds, trajectories.negative_embeds, guidance_scale
    )
    _, log_prob = ddim_step_with_log_prob(
        scheduler, noise, timesteps, latents, eta, prev_sample=trajectories.latents[rows, steps + 1]
    )
    return log_prob, noise


@contextmanager
def adapters_disabled(unet: UNet2DConditionModel):
    """The pretrained model as a reference: the same UNet with its LoRA switched off (no second copy)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@torch.no_grad()
def decode_images(pipe: ParrotPipeline, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to float images ``[N, 3, H, W]`` in [0, 1]."""
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
