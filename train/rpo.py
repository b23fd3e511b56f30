"""RPO: subject-driven fine-tuning with the λ-harmonic reward and a preference loss (METHODS §4).

``python -m train.rpo --config FILE [--resume] [key=value ...]`` (also under ``accelerate launch``) teaches the model
one subject from a few reference images, so that it keeps the subject's identity and still follows new prompts:

1. negatives: the frozen base model draws ``negatives_per_prompt`` images for each training prompt (8 × 4 by
   default, 3 % of DreamBooth's prior images); they are generated once and cached on disk;
2. preference labels: Bradley–Terry, ``y ~ Bernoulli(σ(r(x_ref) − r(x_gen)))`` (sampled, not thresholded) with
   the λ-harmonic reward at ``label_lambda`` (0: text alignment only), both images scored against the negative's
   prompt;
3. each step takes ``train_batch_size`` pairs (a reference image under the instance prompt, a negative under its
   prompt) and minimises ``L = ℓ_θ(x^ref) + BCE(y, σ(Δ))`` with
   ``Δ = [ℓ_pre(x^ref) − ℓ_θ(x^ref)] − [ℓ_pre(x^gen) − ℓ_θ(x^gen)]``, ℓ the per-sample denoising MSE at a random
   timestep; the pretrained model ``pre`` is the same UNet with its LoRA switched off (``full_unet``: a frozen copy);
4. every ``validate_every`` steps the model draws images for the validation prompts (fixed seeds), scored with the
   λ-harmonic reward at ``validation_lambda``; the weights of the best validation are kept (early stopping after
   ``patience`` validations without improvement) and become the result.

Where the paper is silent this follows its authors' code: each image of a pair gets its own noise and timestep;
the identifier stays in the prompts the reward scores (the reward removes it for text alignment). Reference images
are resized (shortest side) and centre-cropped to ``resolution`` and encoded once (the VAE posterior's mean); the
negatives keep the latents the sampler drew.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from parrot_pipeline import ParrotConfig, save_bundle
from parrot_pipeline.bundle import CONFIG_NAME, _hub_id, upload_folder_to_hub
from parrot_pipeline.tiny import _build_once, cache_dir

from .config import DEVICES, LORA_TARGETS, PRECISIONS, _fail, check_cpu_threads, check_push_to_hub, load_config
from .outputs import markdown_table, plot_validation, replacing, save_grid
from .parrot import lora_parameters
from .prompts import read_prompts
from .rewards import resolve_reward
from .rewards.lambda_harmonic import lambda_harmonic
from .rewards.references import read_subject_images
from .run import TrainingRun, create_accelerator
from .sampling import adapters_disabled, decode_images
from .validation import BestIterate

logger = logging.getLogger(__name__)

# Settings a resumed run must share with its checkpoint: they shape the weights, the data or the validation scores.
RESUME_FIXED = ("pretrained_model", "full_unet", "lora_rank", "lora_alpha", "lora_targets", "references", "identifier",
                "class_noun", "instance_prompt", "prompts", "validation_prompts", "negatives_per_prompt",
                "reward_options", "label_lambda", "validation_lambda", "validation_images_per_prompt", "resolution",
                "num_inference_steps", "guidance_scale", "mixed_precision", "seed")  # fmt: skip
REWARD_OPTIONS = ("model", "device", "precision")  # lam, identifier and references come from the RPO settings
VALIDATION_SEED = 50_000  # validation images use seeds seed·100000 + 50000 + k, negatives seed·100000 + k


@dataclass
class RPOConfig:
    """All settings of an RPO run. Defaults: LoRA on the tiny embedded model with the paper's other settings;
    ``configs/rpo_sd21.yaml`` is the paper's run."""

    # --- run ---------------------------------------------------------------------------------------------------
    output_dir: str = "outputs/rpo"
    overwrite: bool = False  # replace an existing output_dir
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda; several GPUs: accelerate launch
    cpu_threads: int | None = None  # torch's intra-op threads per process; null: torch's default
    mixed_precision: str = "no"  # no | fp16 | bf16: frozen weights in half precision, trained weights in float32

    # --- model -------------------------------------------------------------------------------------------------
    pretrained_model: str = "tiny"  # a diffusers folder or Hub id; "tiny": the embedded offline model
    full_unet: bool = False  # train every UNet weight (a frozen copy is the pretrained model); else a LoRA
    lora_rank: int = 4
    lora_alpha: float | None = None  # null: equal to the rank
    lora_targets: str = "attention"  # attention (self + cross) | cross_attention | all

    # --- subject -----------------------------------------------------------------------------------------------
    references: str | None = None  # folder of the subject's 3–5 images (png, jpg, webp, bmp; any size)
    identifier: str = "sks"  # the rare word that names the subject
    class_noun: str = "dog"  # what the subject is
    instance_prompt: str = "a photo of sks dog"  # the reference images' prompt; must contain the identifier
    prompts: str = "train/data/rpo/train_prompts.txt"  # the negatives' prompts; {} is "<identifier> <class_noun>"
    validation_prompts: str = "train/data/rpo/validation_prompts.txt"  # at least 2; {} as in `prompts`

    # --- negatives and reward ----------------------------------------------------------------------------------
    negatives_per_prompt: int = 4
    negatives_cache: str | None = None  # folder of cached negatives; null: $PARROT_PIPELINE_CACHE/rpo-negatives
    reward_options: dict | None = None  # the λ-harmonic reward's model (ALIGN; open_clip name; tiny), device, precision
    label_lambda: float = 0.0  # λ of the preference labels (the paper: 0, text alignment)
    validation_lambda: float = 0.5  # λ of validation and model selection (the paper: 0.3, 0.5 or 0.7)

    # --- sampling (negatives and validation images) ------------------------------------------------------------
    resolution: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5

    # --- optimisation ------------------------------------------------------------------------------------------
    max_steps: int = 400
    train_batch_size: int = 1  # preference pairs per process and step
    learning_rate: float = 1e-4  # the paper's 5e-6 is for the whole UNet (configs/rpo_sd21.yaml)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0  # gradient-norm clipping; null: off

    # --- validation and early stopping -------------------------------------------------------------------------
    validate_every: int = 40  # steps between validations (also after the last step)
    validation_images_per_prompt: int = 4
    patience: int = 0  # stop after this many validations without improvement; 0: run all max_steps

    # --- checkpoints, processes, Hub ---------------------------------------------------------------------------
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in output_dir/checkpoints, if any
    collective_timeout: float = 1800.0  # seconds a process waits for the others before the run stops
    push_to_hub: str | None = None  # Hub repo id for the result; token from HF_TOKEN / hf auth login
    hub_private: bool = False

    def __post_init__(self):
        check_rpo_config(self)

    @property
    def lora_alpha_value(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    def subject(self) -> str:
        return f"{self.identifier} {self.class_noun}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_rpo_config(config: RPOConfig) -> None:
    """Range and consistency checks, each naming the field and what is allowed; no file is read."""
    check_cpu_threads(config.cpu_threads)
    for name, allowed in (("device", DEVICES), ("mixed_precision", PRECISIONS), ("lora_targets", list(LORA_TARGETS))):
        if getattr(config, name) not in allowed:
            _fail(name, getattr(config, name), f"use one of {list(allowed)}")
    if config.references is None:
        _fail("references", None, "the folder holding the subject's reference images is required")
    if not config.identifier or len(config.identifier.split()) != 1 or "{" in config.identifier:
        _fail("identifier", config.identifier, "one word without spaces or braces, e.g. 'sks'")
    if not config.class_noun.strip():
        _fail("class_noun", config.class_noun, "the subject's class, e.g. 'dog'")
    if config.identifier not in config.instance_prompt.split():
        _fail("instance_prompt", config.instance_prompt,
              f"a prompt containing the identifier {config.identifier!r} as a word, e.g. 'a photo of "
              f"{config.subject()}'")  # fmt: skip
    for name in ("label_lambda", "validation_lambda"):
        value = getattr(config, name)
        if not (math.isfinite(value) and 0 <= value <= 1):
            _fail(name, value, "λ in [0, 1] (0: text alignment only, 1: subject fidelity only)")
    for name in ("max_steps", "train_batch_size", "negatives_per_prompt", "validation_images_per_prompt",
                 "num_inference_steps", "lora_rank", "validate_every", "keep_checkpoints"):  # fmt: skip
        if getattr(config, name) < 1:
            _fail(name, getattr(config, name), "an integer ≥ 1")
    for name in ("patience", "checkpoint_every"):
        if getattr(config, name) < 0:
            _fail(name, getattr(config, name), "an integer ≥ 0")
    for name in ("learning_rate", "adam_epsilon", "collective_timeout"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            _fail(name, value, "a finite number > 0")
    for name in ("guidance_scale", "weight_decay"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            _fail(name, value, "a finite number ≥ 0")
    if config.max_grad_norm is not None and not (math.isfinite(config.max_grad_norm) and config.max_grad_norm > 0):
        _fail("max_grad_norm", config.max_grad_norm, "null (off) or a finite number > 0")
    if config.lora_alpha is not None and not (math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
        _fail("lora_alpha", config.lora_alpha, "null (equal to the rank) or a finite number > 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, name) < 1:
            _fail(name, getattr(config, name), "in [0, 1)")
    if config.resolution < 8 or config.resolution % 8:
        _fail("resolution", config.resolution, "a positive multiple of 8")
    check_push_to_hub(config.push_to_hub)
    options = config.reward_options or {}
    unknown = sorted(set(options) - set(REWARD_OPTIONS))
    if unknown:
        _fail("reward_options", options, f"options of the λ-harmonic reward among {list(REWARD_OPTIONS)}, not "
              f"{unknown} (λ, the identifier and the references come from label_lambda/validation_lambda, "
              "identifier and references)")  # fmt: skip
    resolve_reward("lambda_harmonic", {**options, "identifier": config.identifier})


# ----------------------------------------------------------------------------------------------------------------
# Inputs: read and checked before any model loads


@dataclass
class RPOInputs:
    references: list  # the subject's images (PIL, RGB, EXIF orientation applied), any sizes
    prompts: list[str]  # the negatives' prompts, subject filled in
    validation_prompts: list[str]


def subject_prompts(path: str, config: RPOConfig, name: str) -> list[str]:
    """The prompts of a file with ``{}`` replaced by "<identifier> <class noun>"; each must name the subject."""
    prompts = []
    for number, template in enumerate(read_prompts(path), start=1):
        prompt = template.replace("{}", config.subject())
        if config.identifier not in prompt.split():
            raise ValueError(
                f"config `{name}`: prompt {number} of {path}, {template!r}, does not name the subject; write {{}} where "
                f"'{config.subject()}' goes, or the identifier {config.identifier!r} itself."
            )
        prompts.append(prompt)
    return prompts


def load_inputs(config: RPOConfig) -> RPOInputs:
    references = read_subject_images(config.references, "config `references`")
    prompts = subject_prompts(config.prompts, config, "prompts")
    validation = subject_prompts(config.validation_prompts, config, "validation_prompts")
    if len(validation) < 2:
        raise ValueError(
            f"config `validation_prompts`: {config.validation_prompts} holds {len(validation)} prompt; early stopping "
            "needs at least 2, so the best step is not chosen for a single scene."
        )
    return RPOInputs(references, prompts, validation)


# ----------------------------------------------------------------------------------------------------------------
# The loss


def rpo_loss(
    model_ref: torch.Tensor, model_gen: torch.Tensor, pretrained_ref: torch.Tensor, pretrained_gen: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """``L = mean(ℓ_θ(x^ref)) + BCE(y, σ(Δ))`` over a batch of pairs, ``Δ = [ℓ_pre(x^ref) − ℓ_θ(x^ref)] −
    [ℓ_pre(x^gen) − ℓ_θ(x^gen)]``: Δ > 0 when the model denoises the reference image better than the pretrained
    model does, relative to the negative. Arguments are per-pair denoising MSEs ``[B]`` and labels ``y ∈ {0, 1}``
    (1: the reference image is preferred). Returns the loss and its parts."""
    delta = (pretrained_ref - model_ref) - (pretrained_gen - model_gen)
    denoising = model_ref.mean()
    preference = F.binary_cross_entropy_with_logits(delta, labels.to(delta.dtype))
    return denoising + preference, {"denoising": denoising, "preference": preference, "delta": delta.mean()}


def label_probabilities(reference_rewards: torch.Tensor, negative_rewards: torch.Tensor, prompt_index: torch.Tensor):
    """Bradley–Terry ``P(reference preferred) = σ(r(x_ref, c_j) − r(x_gen_j, c_j))`` for every (reference i,
    negative j): ``reference_rewards`` is ``[references, prompts]``, ``negative_rewards`` ``[negatives]`` and
    ``prompt_index[j]`` the prompt of negative j. Returns ``[references, negatives]``."""
    return torch.sigmoid(reference_rewards[:, prompt_index] - negative_rewards[None, :])


# ----------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Negatives:
    latents: torch.Tensor  # [N, C, h, w] float32, what the sampler drew (scaled as the UNet sees them)
    images: torch.Tensor  # [N, 3, H, W] uint8
    prompt_index: torch.Tensor  # [N] long: index into the training prompts
    folder: Path


class RPOTrainer(TrainingRun):
    """Holds everything a run needs, so a checkpoint can be taken from one place."""

    resume_fixed = RESUME_FIXED

    def __init__(self, config: RPOConfig, inputs: RPOInputs | None = None):
        self.config = config
        self.inputs = inputs or load_inputs(config)
        self.output_dir = Path(config.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.accelerator = create_accelerator(config, self.output_dir)
        self.num_processes = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        checkpoint = self._checkpoint_to_resume()
        self._check_output_dir(checkpoint)
        options = {**(config.reward_options or {}), "identifier": config.identifier}
        self.reward = resolve_reward("lambda_harmonic", {**options, "lam": config.validation_lambda})

        self.device = self.accelerator.device
        self.rng = random.Random(config.seed + self.rank)  # pairs and labels: each process draws its own
        self.generator = torch.Generator(self.device).manual_seed(config.seed + self.rank)  # noise and timesteps
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every process

        self._load_base_pipeline()
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

        self.negatives = self._negatives()
        self._encode_references()
        self.instance_embeds = self._text_embeddings([config.instance_prompt])
        self.prompt_embeds = self._text_embeddings(self.inputs.prompts)
        self.preference_probabilities = self._label_probabilities()

        self.frozen_unet = None
        if config.full_unet:  # the pretrained model needs its own copy when every weight trains
            self.frozen_unet = copy.deepcopy(self.pipe.unet).eval()
            self.pipe.unet.to(torch.float32).requires_grad_(True)
        else:
            self.pipe.unet.add_adapter(
                LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha_value, init_lora_weights="gaussian",
                           target_modules=LORA_TARGETS[config.lora_targets])
            )  # fmt: skip
            cast_training_params(self.pipe.unet, dtype=torch.float32)
        self.optimizers = {"unet": torch.optim.AdamW(
            list(self.trainable().values()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, eps=config.adam_epsilon,
        )}  # fmt: skip
        self.lr_schedulers = {"unet": get_scheduler("constant", self.optimizers["unet"])}

        self.iteration = 0  # optimiser steps taken
        self.history: list[dict] = []  # training steps and validations, in order
        self.selection = BestIterate(config.patience)  # the best validation after training began, and its weights
        self.run_id = uuid.uuid4().hex
        self.stop_signal: int | None = None
        self.checkpointed_at: int | None = None

        self._begin(checkpoint, "rpo")
        if self.accelerator.is_main_process:
            save_grid(self.negatives.images.float() / 255, self.output_dir / "samples" / "negatives.png",
                      columns=config.negatives_per_prompt)  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # Data: negatives, references, text, labels

    def negatives_settings(self) -> dict:
        """What the negatives depend on; equal settings share one cache folder."""
        config = self.config
        return {"base_model": self.base_model, "prompts": self.inputs.prompts, "per_prompt": config.negatives_per_prompt,
                "resolution": config.resolution, "steps": config.num_inference_steps,
                "guidance_scale": config.guidance_scale, "seed": config.seed, "precision": config.mixed_precision}  # fmt: skip

    def _negatives(self) -> Negatives:
        """The base model's images for the training prompts, from the cache or generated once (by the main process,
        with the LoRA not yet added) into it."""
        settings = self.negatives_settings()
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.config.negatives_cache) if self.config.negatives_cache else cache_dir() / "rpo-negatives"
        folder = root / key

        def build(building: Path) -> None:
            latents, images = self._generate_negatives()
            save_file({"latents": latents, "images": images}, building / "negatives.safetensors")
            (building / "negatives.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
            save_grid(images.float() / 255, building / "grid.png", columns=self.config.negatives_per_prompt)

        if self.accelerator.is_main_process:
            if folder.is_dir():
                logger.info("Negatives from the cache %s.", folder)
            _build_once(folder, build)
        self.accelerator.wait_for_everyone()
        tensors = load_file(folder / "negatives.safetensors")
        prompt_index = torch.arange(len(self.inputs.prompts)).repeat_interleave(self.config.negatives_per_prompt)
        return Negatives(tensors["latents"], tensors["images"], prompt_index, folder)

    @torch.no_grad()
    def _generate_negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        n = config.negatives_per_prompt
        latents = []
        for index, prompt in enumerate(tqdm(self.inputs.prompts, desc="negatives", leave=False)):
            seeds = [config.seed * 100_000 + index * n + k for k in range(n)]
            with self.accelerator.autocast():
                out = self.pipe([prompt] * n, generator=[torch.Generator(self.device).manual_seed(s) for s in seeds],
                                guidance_scale=config.guidance_scale, expansion_guidance_scale=0.0,
                                num_inference_steps=config.num_inference_steps, height=config.resolution,
                                width=config.resolution, output_type="latent")  # fmt: skip
            latents.append(out.images.float())
        latents = torch.cat(latents)
        images = (decode_images(self.pipe, latents) * 255).round().to(torch.uint8)
        return latents.cpu().contiguous(), images.cpu().contiguous()

    @torch.no_grad()
    def _encode_references(self) -> None:
        """The references at ``resolution`` (shortest side resized, centre crop): pixels in [0, 1] for the reward,
        and their latents, the mean of the VAE's posterior (a trained VAE's posterior spread is negligible)."""
        size = self.config.resolution
        crop = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                                   transforms.CenterCrop(size), transforms.ToTensor()])  # fmt: skip
        self.reference_pixels = torch.stack([crop(image) for image in self.inputs.references])
        self.reference_images = [pil_to_tensor(image).float() / 255 for image in self.inputs.references]  # as given
        vae = self.pipe.vae
        posterior = vae.encode((self.reference_pixels * 2 - 1).to(self.device, vae.dtype)).latent_dist
        self.reference_latents = posterior.mean.float() * vae.config.scaling_factor

    @torch.no_grad()
    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        return self.pipe.encode_prompt(prompts, self.device, 1, False)[0]

    def _label_probabilities(self) -> torch.Tensor:
        """``[references, negatives]`` Bradley–Terry probabilities from the λ-harmonic reward at ``label_lambda``."""
        prompts = self.inputs.prompts
        references = self.reference_pixels.repeat(len(prompts), 1, 1, 1)  # prompt-major: every reference per prompt
        reference_prompts = [prompt for prompt in prompts for _ in self.reference_pixels]
        negative_prompts = [prompts[j] for j in self.negatives.prompt_index]
        reference_rewards = self.rewards(references, reference_prompts, self.config.label_lambda)
        negative_rewards = self.rewards(self.negatives.images.float() / 255, negative_prompts, self.config.label_lambda)
        reference_rewards = reference_rewards.view(len(prompts), -1).T
        return label_probabilities(reference_rewards, negative_rewards, self.negatives.prompt_index)

    def similarities(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The λ-harmonic reward's subject fidelity ``S_I`` and text alignment ``S_T`` of images ``[N, 3, H, W]``."""
        metadata = {"original_prompts": prompts, "reference_images": self.reference_images}
        return self.reward.similarities(images, prompts, metadata)

    def rewards(self, images: torch.Tensor, prompts: list[str], lam: float) -> torch.Tensor:
        return lambda_harmonic(*self.similarities(images, prompts), lam).cpu()

    # ------------------------------------------------------------------------------------------------------------
    # Weights, checkpoints and resume

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The weights that train: the UNet's LoRA, or every UNet weight with ``full_unet``."""
        if self.config.full_unet:
            return dict(self.pipe.unet.named_parameters())
        return lora_parameters(self.pipe.unet)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly; called on every process (it gathers their RNGs)."""
        return {**self.run_state(), "weights": self.trainable(), "selection": self.selection.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, parameter in self.trainable().items():
                parameter.copy_(state["weights"][name])
        self.load_run_state(state)
        self.selection.load_state_dict(state["selection"])

    # ------------------------------------------------------------------------------------------------------------
    # One step

    @contextlib.contextmanager
    def pretrained_unet(self):
        """The pretrained model: the same UNet with the LoRA switched off, or the frozen copy with ``full_unet``."""
        if self.frozen_unet is not None:
            yield self.frozen_unet
        else:
            with adapters_disabled(self.pipe.unet) as unet:
                yield unet

    def draw_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``train_batch_size`` (reference, negative) index pairs and their Bradley–Terry labels, sampled."""
        references, negatives, labels = [], [], []
        for _ in range(self.config.train_batch_size):
            i, j = self.rng.randrange(len(self.reference_latents)), self.rng.randrange(len(self.negatives.latents))
            references.append(i)
            negatives.append(j)
            labels.append(float(self.rng.random() < self.preference_probabilities[i, j].item()))
        return torch.tensor(references), torch.tensor(negatives), torch.tensor(labels)

    def denoising_losses(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Per-sample MSE of the UNet's prediction against the target, in float32."""
        with self.accelerator.autocast():
            prediction = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=embeds).sample
        return ((prediction.float() - target) ** 2).mean(dim=tuple(range(1, prediction.ndim)))

    def noised(self, latents: torch.Tensor, generator: torch.Generator):
        """Each latent noised at its own uniformly drawn training timestep: ``(noisy, timesteps, target)``, the target
        being the noise (epsilon models) or the velocity (v-prediction)."""
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator, device=self.device)  # fmt: skip
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return noisy, timesteps, self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, noise

    def training_step(self) -> dict:
        started = time.perf_counter()
        references, negatives, labels = self.draw_pairs()
        batch = len(labels)
        latents = torch.cat([self.reference_latents[references], self.negatives.latents[negatives].to(self.device)])
        embeds = torch.cat([self.instance_embeds.expand(batch, -1, -1),
                            self.prompt_embeds[self.negatives.prompt_index[negatives]]])  # fmt: skip
        noisy, timesteps, target = self.noised(latents, self.generator)
        model = self.denoising_losses(self.pipe.unet, noisy, timesteps, embeds, target)
        with torch.no_grad(), self.pretrained_unet() as unet:
            pretrained = self.denoising_losses(unet, noisy, timesteps, embeds, target)
        loss, parts = rpo_loss(model[:batch], model[batch:], pretrained[:batch], pretrained[batch:],
                               labels.to(self.device))  # fmt: skip
        self.optimizers["unet"].zero_grad(set_to_none=True)
        self.accelerator.backward(loss / self.num_processes)  # the summed gradients are the mean over processes
        stepped = self._optimizer_step("unet")
        values = torch.stack([loss.detach(), *(value.detach() for value in parts.values()), labels.mean().to(self.device)])
        if self.num_processes > 1:
            values = self._collective("averaging the loss", self.accelerator.reduce, values, "mean")
        loss_value, denoising, preference, delta, label_mean = values.tolist()
        return {"step": self.iteration + 1, "loss": loss_value, "loss/denoising": denoising, "loss/preference": preference,
                "delta": delta, "label_mean": label_mean, "lr": self.optimizers["unet"].param_groups[0]["lr"],
                "skipped": not stepped, "seconds": time.perf_counter() - started}  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # Validation and early stopping

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> torch.Tensor:
        """The current model's validation images, ``validation_images_per_prompt`` per prompt with fixed seeds, plain
        classifier-free guidance; float ``[N, 3, H, W]`` in [0, 1]."""
        config = self.config
        n = config.validation_images_per_prompt
        images = []
        for index, prompt in enumerate(prompts):
            seeds = [config.seed * 100_000 + VALIDATION_SEED + index * n + k for k in range(n)]
            with self.accelerator.autocast():
                out = self.pipe([prompt] * n, generator=[torch.Generator(self.device).manual_seed(s) for s in seeds],
                                guidance_scale=config.guidance_scale, expansion_guidance_scale=0.0,
                                num_inference_steps=config.num_inference_steps, height=config.resolution,
                                width=config.resolution, output_type="pt")  # fmt: skip
            images.append(out.images.float().cpu())
        return torch.cat(images)

    def validate(self) -> dict:
        """λ-harmonic score of the validation images (main process; shared with the others). Saves their grid."""
        record = None
        if self.accelerator.is_main_process:
            prompts = [p for p in self.inputs.validation_prompts for _ in range(self.config.validation_images_per_prompt)]
            images = self.generate(self.inputs.validation_prompts)
            save_grid(images, self.validation_grid(self.iteration), columns=self.config.validation_images_per_prompt)
            subject, alignment = self.similarities(images, prompts)
            record = {
                "step": self.iteration,
                "validation/lambda_harmonic": lambda_harmonic(subject, alignment, self.config.validation_lambda).mean().item(),
                "validation/subject_fidelity": subject.mean().item(),
                "validation/text_alignment": alignment.mean().item(),
                "validation/reference_loss": self.reference_loss(),
            }  # fmt: skip
        if self.num_processes > 1:
            record = self._collective("sharing the validation", broadcast_object_list, [record])[0]
        return record

    @torch.no_grad()
    def reference_loss(self, draws: int = 8) -> float:
        """The denoising MSE of the reference images under the instance prompt, ``draws`` fixed (noise, timestep)
        draws per image: how closely the model has learned the references."""
        latents = self.reference_latents.repeat(draws, 1, 1, 1)
        noisy, timesteps, target = self.noised(latents, torch.Generator(self.device).manual_seed(self.config.seed))
        embeds = self.instance_embeds.expand(len(latents), -1, -1)
        return self.denoising_losses(self.pipe.unet, noisy, timesteps, embeds, target).mean().item()

    def validation_grid(self, step: int) -> Path:
        return self.output_dir / "samples" / f"validation_step_{step:06d}.png"

    def record_validation(self, record: dict) -> None:
        """Log a validation and offer it to the selection; the main process keeps the best one's weights."""
        self.log(record)
        keep = self.accelerator.is_main_process
        weights = (lambda: {name: value.detach().cpu().clone() for name, value in self.trainable().items()}) if keep else None
        self.selection.offer(self.iteration, record["validation/lambda_harmonic"], weights)

    @property
    def best(self) -> dict | None:
        """Step and score of the best validation after training began."""
        if self.selection.iteration is None:
            return None
        return {"step": self.selection.iteration, "score": self.selection.score}

    @property
    def best_weights(self) -> dict[str, torch.Tensor] | None:
        return self.selection.snapshot

    @property
    def validations(self) -> list[dict]:
        return [record for record in self.history if "validation/lambda_harmonic" in record]

    def stopped_early(self) -> bool:
        """Whether ``patience`` validations in a row have not improved on the best one."""
        return self.selection.patience_exhausted()

    # ------------------------------------------------------------------------------------------------------------
    # The loop and the outputs

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            self.metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def train_loop(self) -> None:
        """The steps left, with validations, early stopping, checkpoints and a progress bar.

        On SIGTERM/SIGINT the current step finishes, a checkpoint is written and the process exits with 128 + the
        signal number; a second signal stops at once.
        """
        config = self.config
        if not self.validations:  # the base model: the "before" of the run
            self.record_validation(self.validate())
        progress = tqdm(total=config.max_steps, initial=self.iteration, desc="rpo",
                        disable=not self.accelerator.is_main_process)  # fmt: skip
        with self.stop_on_signals():
            while self.iteration < config.max_steps and not self.stopped_early():
                record = self.training_step()
                self.step_lr_schedulers()
                self.iteration += 1
                self.log(record)
                progress.update()
                progress.set_postfix({"loss": f"{record['loss']:.4f}",
                                      "best": f"{self.best['score']:.4f}" if self.best else "-"})  # fmt: skip
                if self.iteration % config.validate_every == 0 or self.iteration == config.max_steps:
                    self.record_validation(self.validate())
                if config.checkpoint_every and self.iteration % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._stop_requested():
                    self._stop_with_checkpoint(progress)
        progress.close()
        if self.stopped_early():
            print(f"early stopping at step {self.iteration}: {config.patience} validations without improvement on "
                  f"step {self.best['step']}")  # fmt: skip
        if self.checkpointed_at != self.iteration:
            self.save_checkpoint()

    def run(self) -> dict:
        """Train, then write the best validation's weights as the result (bundle, or the whole pipeline with
        ``full_unet``) with its model card, the validation plot and ``rpo.json``; push to the Hub when asked."""
        config = self.config
        self.train_loop()
        results: dict = {}
        if self.accelerator.is_main_process:
            with torch.no_grad():
                for name, parameter in self.trainable().items():
                    parameter.copy_(self.best_weights[name])
            validations = self.validations
            results = {"before": validations[0], "best": self.best, "validations": validations,
                       "steps": self.iteration, "stopped_early": self.stopped_early()}  # fmt: skip
            card = self.card_sections(results)
            gallery = [(f"step {self.best['step']}: {', '.join(self.inputs.validation_prompts)}",
                        self.validation_grid(self.best["step"]))]  # fmt: skip
            folder = self.save_full_model(card, gallery) if config.full_unet else self.save_bundle(card, gallery)
            results["output"] = str(folder)
            series = {f"λ-harmonic (λ = {config.validation_lambda})": "validation/lambda_harmonic",
                      "subject fidelity S_I": "validation/subject_fidelity",
                      "text alignment S_T": "validation/text_alignment"}  # fmt: skip
            plot_validation(self.validations, series, self.best["step"], self.output_dir / "plots" / "validation.png",
                            x_key="step")  # fmt: skip
            with replacing(self.output_dir / "rpo.json") as temporary:
                temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            print(self.validation_table(results))
            print(f"{'model' if config.full_unet else 'bundle'}: {folder}")
            if config.push_to_hub:
                results["hub"] = self.push(folder, upload_folder_to_hub) if config.full_unet else self.push(folder)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return results

    def parrot_config(self) -> ParrotConfig:
        config = self.config
        return ParrotConfig(
            base_model=self.base_model,
            reward_names=["lambda_harmonic"],
            reward_identifiers=[],
            guidance_scale=config.guidance_scale,
            expansion_guidance_scale=0.0,
            method="rpo",
            extra={"identifier": config.identifier, "class_noun": config.class_noun,
                   "instance_prompt": config.instance_prompt, "train_config": config.to_dict()},  # fmt: skip
        )

    def save_bundle(self, card_sections: str, gallery) -> Path:
        return save_bundle(self.output_dir / "bundle", unet=self.pipe.unet, config=self.parrot_config(),
                           card_sections=card_sections, gallery=gallery, overwrite=True)  # fmt: skip

    def save_full_model(self, card_sections: str, gallery) -> Path:
        """``model/``: a ``StableDiffusionPipeline`` with the fine-tuned UNet (diffusers layout, safetensors),
        ``parrot_config.json`` and a model card; built under a temporary name and renamed."""
        target = self.output_dir / "model"
        building = self.output_dir / ".model.building"
        shutil.rmtree(building, ignore_errors=True)
        self.pipe.to(dtype=torch.float32)  # one dtype for every component (the frozen ones as the run used them)
        components = {name: getattr(self.pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(building, safe_serialization=True)  # fmt: skip
        samples = building / "samples"
        samples.mkdir()
        entries = []
        for caption, image in gallery:
            shutil.copyfile(image, samples / Path(image).name)
            entries.append({"text": caption, "output": {"url": f"samples/{Path(image).name}"}})
        config = self.parrot_config()
        (building / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        data = ModelCardData(library_name="diffusers", tags=["text-to-image", "stable-diffusion", "rpo"], widget=entries,
                             base_model=_hub_id(self.base_model))  # fmt: skip
        ModelCard(f"""---
{data.to_yaml()}
---

# RPO: `{self.config.subject()}` on `{self.base_model}`

The whole Stable Diffusion pipeline with its UNet fine-tuned by RPO (subject-driven preference fine-tuning with the
λ-harmonic reward). Load it as any diffusers model and name the subject as trained:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")
pipe("a {self.config.subject()} in the snow").images[0].save("subject.png")
```

{card_sections}""").save(building / "README.md")
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)
        return target

    def card_sections(self, results: dict) -> str:
        config = self.config
        settings = ["pretrained_model", "full_unet", "lora_rank", "lora_targets", "max_steps", "train_batch_size",
                    "learning_rate", "weight_decay", "max_grad_norm", "resolution", "negatives_per_prompt",
                    "label_lambda", "validation_lambda", "validate_every", "patience", "seed"]  # fmt: skip
        rows = "\n".join(f"| `{name}` | `{getattr(config, name)}` |" for name in settings)
        return f"""## RPO

The subject is `{config.subject()}`: put it in your prompts, e.g. "a {config.subject()} on a beach". It was learned from
{len(self.inputs.references)} reference images with the instance prompt "{config.instance_prompt}" and
{len(self.negatives.latents)} images of the base model for {len(self.inputs.prompts)} training prompts as negatives.

| setting | value |
|---|---|
{rows}

## Validation

λ-harmonic reward (λ = {config.validation_lambda}) of {config.validation_images_per_prompt} images for each validation
prompt ({"; ".join(self.inputs.validation_prompts)}), fixed seeds. This model is step {results["best"]["step"]}, the best
validation after training began; step 0 is the base model.

{self.validation_table(results)}
"""

    def validation_table(self, results: dict) -> str:
        keys = ("lambda_harmonic", "subject_fidelity", "text_alignment", "reference_loss")
        rows = [[str(record["step"]) + (" (best)" if record["step"] == results["best"]["step"] else ""),
                 *(f"{record[f'validation/{key}']:.4f}" for key in keys)] for record in results["validations"]]  # fmt: skip
        header = ["step", f"λ-harmonic (λ = {self.config.validation_lambda})", "subject fidelity S_I",
                  "text alignment S_T", "reference denoising loss"]  # fmt: skip
        return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    """Exits with 2 on bad input (before any output is written), 1 when the run finished but its Hub upload failed
    (the result is kept locally), and 128 + N when signal N stopped it after writing a checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m train.rpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a YAML preset such as configs/rpo_quickstart.yaml (or your own)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (resume=true)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the preset's")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, [*args.overrides, *(["resume=true"] if args.resume else [])], RPOConfig)
        inputs = load_inputs(config)
    except (ValueError, TypeError, OSError) as error:
        parser.exit(2, f"python -m train.rpo: error: {error}\n")
    results = RPOTrainer(config, inputs).run()
    return 1 if "error" in results.get("hub", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
