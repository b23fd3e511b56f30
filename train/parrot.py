"""The multi-reward RL loop: Parrot (batch-wise Pareto selection), DPOK (KL-regularised) and DDPO (PPO) modes.

One iteration (METHODS §2): take one prompt ``c``; the expander samples ``ĉ``; for each reward k the identifier
``<reward k>`` is prepended (``ĉ_k``) and N trajectories are sampled; every image is scored by all K rewards (an
N×K matrix per identifier); the non-dominated rows P_k of that matrix are kept; the UNet LoRA gets the policy
gradient of the samples in P weighted by their own reward ``r_k`` and 1/|P|, and the expander the REINFORCE
gradient of ``log p_φ(ĉ | c)`` weighted by the same rewards. Samples outside P never enter a gradient pass.

``dpok`` and ``ddpo`` score a weighted sum of the rewards on the original prompt (no expander, no identifiers);
``dpok`` adds β·KL to the pretrained UNet (the same UNet with the LoRA disabled), ``ddpo`` uses PPO clipping and
per-prompt advantage normalisation.

Losses average over the trained timesteps of a trajectory (DDPO's convention); the paper's sum over timesteps
differs by the constant factor T, absorbed in the learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from parrot_pipeline import ParrotConfig, ParrotPipeline, save_bundle
from parrot_pipeline.bundle import default_reward_identifiers
from parrot_pipeline.expansion import (
    DEFAULT_TEMPLATE,
    ExpanderConfig,
    compose_expanded_prompt,
    continuation_log_probs,
    generate_expansions,
    load_expander,
)
from parrot_pipeline.tiny import default_tiny_expander, default_tiny_model

from .config import LORA_TARGETS, TrainConfig
from .outputs import MetricsWriter, evaluation_table, plot_pareto, plot_rewards, save_grid
from .pareto import compare_reward_sets, non_dominated_mask
from .prompts import read_prompts
from .rewards import resolve_reward, score_images
from .sampling import (
    Trajectories,
    adapters_disabled,
    decode_images,
    encode_prompts,
    guided_noise,
    recompute_log_prob,
    sample_trajectories,
)
from .sft import load_pairs, supervised_finetune
from .stats import PerPromptStatTracker, standardise

logger = logging.getLogger(__name__)
EXPANDER_TARGETS = ["c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj"]


def policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float | None
) -> torch.Tensor:
    """Per-sample policy-gradient loss ``−A·ratio``; with ``clip_range``, PPO's pessimistic clipped form."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = -advantages * ratio
    if clip_range is None:
        return loss
    return torch.maximum(loss, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))


def make_advantages(rewards: torch.Tensor, mode: str, clip: float, tracker: PerPromptStatTracker, key: str):
    """Reward signal of one group: raw rewards, or standardised over the batch or per prompt, then clipped."""
    if mode == "raw":
        return rewards
    finite = rewards[torch.isfinite(rewards)]
    normalised = standardise(rewards, finite) if mode == "batch" else tracker.normalise(key, rewards)
    return normalised.clamp(-clip, clip)


class Trainer:
    """Holds everything a run needs, so a checkpoint can be taken from one place."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not config.overwrite:
            raise FileExistsError(
                f"`output_dir` {str(self.output_dir)!r} already exists and is not empty; pass overwrite=true to "
                "replace it or choose another output_dir."
            )
        self.prompts = read_prompts(config.prompts)
        self.eval_prompts = read_prompts(config.eval_prompts)
        self.sft_pairs = load_pairs(config.expander_sft_data) if config.expander_sft_data and config.uses_expander else None
        options = config.reward_options or {}
        self.reward_fns = {name: resolve_reward(name, options.get(name)) for name in config.rewards}

        if config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("config `device` = 'cuda' but no CUDA device is available; use device: cpu or auto.")
        self.accelerator = Accelerator(
            cpu=config.device == "cpu" or not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            log_with="tensorboard",
            project_dir=str(self.output_dir / "logs"),
        )
        self.device = self.accelerator.device
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        torch.manual_seed(config.seed)

        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        self.base_model = str(default_tiny_model()) if config.pretrained_model == "tiny" else config.pretrained_model
        self.pipe = ParrotPipeline.from_pretrained(
            self.base_model, torch_dtype=self.weight_dtype, expander=None, expander_tokenizer=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        self.pipe.unet.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha_value,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS[config.lora_targets],
            )
        )
        cast_training_params(self.pipe.unet, dtype=torch.float32)
        self.unet_parameters = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        if not config.train_unet:
            for parameter in self.unet_parameters:
                parameter.requires_grad_(False)
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.identifiers = config.reward_identifiers or default_reward_identifiers(len(config.rewards))
        self.weights = torch.tensor(config.reward_weights or [1.0 / len(config.rewards)] * len(config.rewards))
        self.tracker = PerPromptStatTracker()
        self.iteration = 0
        self.sft_losses: list[float] = []
        self._load_expander()
        self.optimizers, self.lr_schedulers = self._optimizers()

        # Only now, with every input checked and every model loaded, does the run touch output_dir.
        if config.overwrite and self.output_dir.exists():
            shutil.rmtree(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.init_trackers("parrot", config={k: str(v) for k, v in config.to_dict().items()})
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl")
        self.history: list[dict] = []
        self.reward_batches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Set-up

    def _load_expander(self) -> None:
        config = self.config
        self.expander = self.expander_tokenizer = None
        self.expander_config = None
        if not config.uses_expander:
            return
        source = str(default_tiny_expander()) if config.expander_model == "tiny" else config.expander_model
        model, tokenizer = load_expander(source)
        self.expander_config = ExpanderConfig(
            base_model=source,
            template=config.expander_template or DEFAULT_TEMPLATE,
            max_new_tokens=config.expander_max_new_tokens,
        )
        model.to(self.device)
        if self.sft_pairs:
            self.sft_losses = supervised_finetune(
                model, tokenizer, self.sft_pairs, self.expander_config,
                epochs=config.expander_sft_epochs, learning_rate=config.expander_sft_learning_rate,
                batch_size=config.expander_sft_batch_size, seed=config.seed,
            )  # fmt: skip
        model.requires_grad_(False)
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(EXPANDER_TARGETS))
        self.expander = get_peft_model(
            model, LoraConfig(r=config.expander_lora_rank, lora_alpha=config.expander_lora_rank,
                              target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2")
        )  # fmt: skip
        if config.freeze_expander:
            self.expander.requires_grad_(False)
        self.expander_tokenizer = tokenizer

    def _optimizers(self):
        config = self.config
        groups = {}
        if config.train_unet:
            groups["unet"] = (self.unet_parameters, config.learning_rate)
        if self.expander is not None and not config.freeze_expander:
            groups["expander"] = ([p for p in self.expander.parameters() if p.requires_grad], config.expander_learning_rate)
        optimizers = {
            name: torch.optim.AdamW(
                parameters, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=config.weight_decay, eps=config.adam_epsilon,
            )  # fmt: skip
            for name, (parameters, lr) in groups.items()
        }
        schedulers = {name: get_scheduler("constant", optimizer) for name, optimizer in optimizers.items()}
        return optimizers, schedulers

    # ------------------------------------------------------------------------------------------------------------
    # One iteration

    def branch_texts(self, prompt: str, expansion: str) -> list[str]:
        """The prompt of each sampled group: ``ĉ_k`` per reward in parrot mode, the prompt itself otherwise."""
        if self.config.mode == "parrot":
            return [compose_expanded_prompt([identifier], expansion) for identifier in self.identifiers]
        return [prompt]

    def sample(self, texts: list[str]):
        """Trajectories for ``images_per_prompt`` samples of each text, in chunks of ``train_batch_size``."""
        config = self.config
        prompt_embeds, negative_embeds = encode_prompts(self.pipe, texts)
        repeat = config.images_per_prompt
        prompt_embeds = prompt_embeds.repeat_interleave(repeat, dim=0)
        negative_embeds = negative_embeds.repeat_interleave(repeat, dim=0)
        chunks = []
        with self.accelerator.autocast():
            for start in range(0, len(prompt_embeds), config.train_batch_size):
                chunk = slice(start, start + config.train_batch_size)
                chunks.append(
                    sample_trajectories(
                        self.pipe, self.scheduler, prompt_embeds[chunk], negative_embeds[chunk],
                        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                        eta=config.eta, height=config.resolution, width=config.resolution, generator=self.generator,
                    )  # fmt: skip
                )
        trajectories = Trajectories.cat(chunks)
        images = torch.cat([decode_images(self.pipe, chunk.final_latents) for chunk in chunks])
        return trajectories, images

    def select(self, prompt: str, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which samples train, and their advantages. ``rewards`` is ``[groups·N, K]``."""
        config = self.config
        n = config.images_per_prompt
        if config.mode == "parrot":
            selected = torch.zeros(len(rewards), dtype=torch.bool)
            advantages = torch.zeros(len(rewards))
            for k in range(len(self.identifiers)):
                group = slice(k * n, (k + 1) * n)
                selected[group] = non_dominated_mask(rewards[group])
                advantages[group] = make_advantages(
                    rewards[group, k], config.advantage, config.advantage_clip, self.tracker, f"{prompt}\x00{k}"
                )
        else:
            combined = rewards @ self.weights
            selected = torch.isfinite(combined)
            advantages = make_advantages(combined, config.advantage, config.advantage_clip, self.tracker, prompt)
        advantages = torch.where(selected, advantages, torch.zeros_like(advantages))
        return selected, advantages

    def t2i_loss_and_step(self, trajectories, selected: torch.Tensor, advantages: torch.Tensor) -> dict:
        """Policy-gradient passes over the selected samples only; returns loss statistics."""
        config = self.config
        front = selected.nonzero().squeeze(1)
        num_steps = trajectories.log_probs.shape[1]
        steps = sorted(self.rng.sample(range(num_steps), max(1, round(config.timestep_fraction * num_steps))))
        optimizer = self.optimizers["unet"]
        optimizer.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "kl": 0.0, "clipped_fraction": 0.0, "skipped": False}
        count = 0
        for start in range(0, len(front), config.train_batch_size):
            index = front[start : start + config.train_batch_size]
            batch = trajectories.select(index.to(trajectories.latents.device))
            batch_advantages = advantages[index].to(self.device)
            for step in steps:
                with self.accelerator.autocast():
                    log_prob, noise = recompute_log_prob(
                        self.pipe.unet, self.scheduler, batch, step, guidance_scale=config.guidance_scale, eta=config.eta
                    )
                    loss_per_sample = config.reward_scale * policy_loss(
                        log_prob, batch.log_probs[:, step], batch_advantages, config.clip_range
                    )
                    if config.kl_beta > 0:
                        kl = self.kl_to_pretrained(batch, step, noise)
                        loss_per_sample = loss_per_sample + config.kl_beta * kl
                        stats["kl"] += kl.sum().item()
                loss = loss_per_sample.sum() / (len(front) * len(steps))
                if not torch.isfinite(loss):
                    logger.warning("iteration %d: non-finite loss; the update is skipped", self.iteration)
                    optimizer.zero_grad(set_to_none=True)
                    stats["skipped"] = True
                    return stats
                self.accelerator.backward(loss)
                if config.clip_range is not None:
                    ratio = torch.exp(log_prob.detach() - batch.log_probs[:, step])
                    stats["clipped_fraction"] += ((ratio - 1).abs() > config.clip_range).float().sum().item()
                stats["loss"] += loss.item()
                count += len(index)
                if not config.accumulate_timesteps:
                    self._optimizer_step("unet")
        if config.accumulate_timesteps:
            self._optimizer_step("unet")
        stats["kl"] /= max(count, 1)
        stats["clipped_fraction"] /= max(count, 1)
        return stats

    def kl_to_pretrained(self, batch, step: int, noise: torch.Tensor) -> torch.Tensor:
        """DPOK's per-step KL term: squared distance of the guided predictions of the policy and the pretrained UNet
        (the two Gaussians share their variance, so the KL is proportional to it)."""
        with torch.no_grad(), adapters_disabled(self.pipe.unet):
            reference = guided_noise(
                self.pipe.unet, self.scheduler, batch.latents[:, step], batch.timesteps[step],
                batch.prompt_embeds, batch.negative_embeds, self.config.guidance_scale,
            )  # fmt: skip
        return ((noise.float() - reference.float()) ** 2).mean(dim=tuple(range(1, noise.ndim)))

    def _optimizer_step(self, name: str) -> None:
        parameters = [p for group in self.optimizers[name].param_groups for p in group["params"]]
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.optimizers[name].step()
        self.lr_schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def expander_loss_and_step(self, expansions, selected: torch.Tensor, advantages: torch.Tensor) -> float:
        """REINFORCE on the expansion: ``−(Σ_{i∈P} A_i / |P|) · log p_φ(ĉ | c)``."""
        weight = advantages[selected].sum() / selected.sum()
        log_prob = continuation_log_probs(
            self.expander, expansions.input_ids, expansions.attention_mask, expansions.new_tokens, expansions.new_mask
        )
        loss = -(weight.to(log_prob.device) * log_prob).sum()
        if not torch.isfinite(loss):
            logger.warning("iteration %d: non-finite expander loss; its update is skipped", self.iteration)
            return float("nan")
        self.optimizers["expander"].zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self._optimizer_step("expander")
        return loss.item()

    def train_iteration(self) -> dict:
        config = self.config
        started = time.perf_counter()
        prompt = self.rng.choice(self.prompts)
        expansions = None
        if self.expander is not None:
            expansions = generate_expansions(
                self.expander, self.expander_tokenizer, [prompt], self.expander_config, seed=self.rng.randrange(2**31)
            )
            expansion = expansions.texts[0]
        else:
            expansion = prompt
        texts = self.branch_texts(prompt, expansion)
        trajectories, images = self.sample(texts)
        branch_prompts = [text for text in texts for _ in range(config.images_per_prompt)]
        metadata = {"original_prompts": [prompt] * len(images), "expanded_prompts": branch_prompts}
        rewards = score_images(self.reward_fns, images, [prompt] * len(images), metadata)
        selected, advantages = self.select(prompt, rewards)

        record = {"iteration": self.iteration, "prompt": prompt, "expanded_prompt": expansion}
        finite_rows = torch.isfinite(rewards).all(dim=1)
        for k, name in enumerate(config.rewards):
            column = rewards[:, k][torch.isfinite(rewards[:, k])]
            record[f"reward/{name}"] = column.mean().item() if len(column) else float("nan")
        record["front_fraction"] = selected.float().mean().item()
        record["nonfinite_samples"] = int((~finite_rows).sum())
        if selected.any():
            if config.train_unet:
                stats = self.t2i_loss_and_step(trajectories, selected, advantages)
                record.update({"loss/t2i": stats["loss"], "kl": stats["kl"], "skipped": stats["skipped"]})
                if config.clip_range is not None:
                    record["clipped_fraction"] = stats["clipped_fraction"]
            if "expander" in self.optimizers:
                record["loss/expander"] = self.expander_loss_and_step(expansions, selected, advantages)
        else:
            logger.warning("iteration %d: no sample with finite rewards; the update is skipped", self.iteration)
            record["skipped"] = True
        for name, optimizer in self.optimizers.items():
            record[f"lr/{name}"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - started
        if self.iteration == 0:
            self.reward_batches["first"] = (rewards, selected)
        self.reward_batches["last"] = (rewards, selected)
        return record

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation and outputs

    def parrot_config(self) -> ParrotConfig:
        config = self.config
        return ParrotConfig(
            base_model=self.base_model,
            reward_names=list(config.rewards),
            reward_identifiers=list(self.identifiers) if config.mode == "parrot" else [],
            guidance_scale=config.guidance_scale,
            expansion_guidance_scale=config.eval_expansion_guidance_scale if config.mode == "parrot" else 0.0,
            expander=self.expander_config,
            method=config.mode,
            extra={"train_config": config.to_dict()},
        )

    def _bundle_expander(self):
        """The expander as the bundle stores it: the adapter alone over its base, or (after a supervised stage
        changed every weight) the full model with the adapter merged."""
        if self.expander is None:
            return None
        if self.sft_pairs:
            return copy.deepcopy(self.expander).merge_and_unload()
        return self.expander

    @torch.no_grad()
    def generate(self, prompts: list[str], trained: bool, seed: int) -> tuple[torch.Tensor, list[str]]:
        """Images of the trained model (expansion, identifiers, original-prompt-centred guidance) or of the base
        model (plain CFG, LoRA off) through ParrotPipeline, float ``[N, 3, H, W]`` in [0, 1]."""
        config = self.config
        pipe = self.pipe
        pipe.register_modules(expander=self.expander if trained else None, expander_tokenizer=self.expander_tokenizer)
        pipe.expander_config = self.expander_config or ExpanderConfig()
        pipe.parrot_config = self.parrot_config() if trained else None
        repeated = [p for p in prompts for _ in range(config.eval_images_per_prompt)]
        generators = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(repeated))]
        kwargs = dict(
            guidance_scale=config.guidance_scale, num_inference_steps=config.num_inference_steps,
            height=config.resolution, width=config.resolution, output_type="pt", eta=0.0,
        )  # fmt: skip
        images, texts = [], []
        for start in range(0, len(repeated), config.train_batch_size):
            chunk = slice(start, start + config.train_batch_size)
            if trained:
                out = pipe(repeated[chunk], generator=generators[chunk],
                           expansion_guidance_scale=pipe.parrot_config.expansion_guidance_scale, **kwargs)  # fmt: skip
            else:
                with adapters_disabled(pipe.unet):
                    out = pipe(repeated[chunk], generator=generators[chunk], expansion_guidance_scale=0.0, **kwargs)
            images.append(out.images.float().cpu())
            texts.extend(out.expanded_prompts or repeated[chunk])
        pipe.register_modules(expander=None, expander_tokenizer=None)
        return torch.cat(images), texts

    def eval_rewards(self, trained: bool) -> torch.Tensor:
        """Reward matrix ``[prompts × eval_images_per_prompt, K]`` of the held-out prompts, fixed seeds."""
        images, texts = self.generate(self.eval_prompts, trained=trained, seed=10_000)
        prompts = [p for p in self.eval_prompts for _ in range(self.config.eval_images_per_prompt)]
        label = "trained" if trained else "base"
        save_grid(images, self.output_dir / "samples" / f"eval_{label}.png", columns=self.config.eval_images_per_prompt)
        return score_images(self.reward_fns, images, prompts, {"original_prompts": prompts, "expanded_prompts": texts})

    def evaluate(self) -> dict:
        """Held-out prompts, base vs trained: each reward's mean and the hypervolume of the reward vectors."""
        matrices = {"base": self.eval_rewards(trained=False), "trained": self.eval_rewards(trained=True)}
        return compare_reward_sets(matrices, self.config.rewards)

    def save_bundle(self) -> Path:
        expander = self._bundle_expander()
        config = self.parrot_config()
        if expander is not None and self.sft_pairs:  # the bundle holds the whole expander: no base model needed
            config.expander = dataclasses.replace(self.expander_config, base_model=None)
        return save_bundle(
            self.output_dir / "bundle",
            unet=self.pipe.unet,
            config=config,
            expander=expander,
            expander_tokenizer=self.expander_tokenizer if expander is not None else None,
            overwrite=True,
        )

    def train_loop(self) -> None:
        """All iterations, with metrics, TensorBoard scalars, a progress bar and periodic sample grids."""
        config = self.config
        if self.sft_losses:
            print(f"expander supervised stage: loss {self.sft_losses[0]:.3f} → {self.sft_losses[-1]:.3f}")
        progress = tqdm(range(config.iterations), desc=config.mode, disable=not self.accelerator.is_main_process)
        for _ in progress:
            record = self.train_iteration()
            self.history.append(record)
            if self.accelerator.is_main_process:
                self.metrics.write(record)
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=self.iteration)
            progress.set_postfix(
                {name.split("/")[1][:12]: f"{record[name]:.3g}" for name in record if name.startswith("reward/")}
                | {"front": f"{record['front_fraction']:.2f}"}
            )
            self.iteration += 1
            if config.eval_every and self.iteration % config.eval_every == 0 and self.iteration < config.iterations:
                images, _ = self.generate(self.eval_prompts[:4], trained=True, seed=10_000)
                save_grid(images, self.output_dir / "samples" / f"iter_{self.iteration:05d}.png",
                          columns=config.eval_images_per_prompt)  # fmt: skip

    def run(self) -> dict:
        """Train, then write the bundle, evaluate base vs trained on held-out prompts, and plot."""
        self.train_loop()
        bundle = self.save_bundle()
        results = self.evaluate()
        plot_rewards(self.history, self.config.rewards, self.output_dir / "plots" / "rewards.png")
        plot_pareto(self.reward_batches, self.config.rewards, self.output_dir / "plots" / "pareto.png")
        (self.output_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
        self.accelerator.end_training()
        print(evaluation_table(results, self.config.rewards))
        print(f"bundle: {bundle}")
        return results


def train(config: TrainConfig) -> dict:
    return Trainer(config).run()

