"""The multi-reward RL loop: Parrot (batch-wise Pareto selection), DPOK (KL-regularised) and DDPO (PPO) modes.

One iteration (METHODS §2): take one prompt ``c``; the expander samples ``ĉ``; for each reward k the identifier
``<reward k>`` is prepended (``ĉ_k``) and N trajectories are sampled; every image is scored by all K rewards (an
N×K matrix per identifier); the non-dominated rows P_k of that matrix are kept. The UNet LoRA gets the policy
gradient of the samples in P_k weighted by their own reward ``r_k`` and ``1/(K·|P_k|)`` (each identifier's front
weighs the same), and the expander the REINFORCE gradient of ``log p_φ(ĉ | c)`` weighted by the sum of those
rewards over every front. Samples outside the fronts never enter a gradient pass.

``dpok`` and ``ddpo`` score a weighted sum of the rewards on the original prompt (no expander, no identifiers);
``dpok`` adds β·KL to the pretrained UNet (the same UNet with the LoRA disabled), ``ddpo`` uses PPO clipping and
per-prompt advantage normalisation. All modes update on DDPO's schedule (``Trainer.t2i_update``): minibatches of
``train_batch_size``, ``gradient_accumulation_steps`` of them per optimiser step, ``num_inner_epochs`` passes.

Losses average over the trained timesteps of a trajectory (DDPO's convention); the paper's sum over timesteps
differs by the constant factor T, absorbed in the learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate.utils import broadcast, broadcast_object_list
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from parrot_pipeline import ParrotConfig, save_bundle
from parrot_pipeline.bundle import default_reward_identifiers
from parrot_pipeline.expansion import (
    DEFAULT_TEMPLATE,
    ExpanderConfig,
    GeneratedExpansions,
    add_lora,
    compose_expanded_prompt,
    continuation_log_probs,
    generate_expansions,
    load_expander,
)
from parrot_pipeline.tiny import default_tiny_expander

from .checkpoint import sha256_of
from .config import LORA_TARGETS, RESUME_FIXED, TrainConfig
from .outputs import (
    MetricsWriter,
    evaluation_table,
    model_card_sections,
    plot_pareto,
    plot_rewards,
    plot_validation,
    save_grid,
)
from .pareto import compare_reward_sets, non_dominated_mask
from .prompts import read_prompts
from .rewards import resolve_reward, score_images
from .run import TrainingRun, create_accelerator
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
from .validation import BestIterate, RewardValidation, scale_learning_rates

logger = logging.getLogger(__name__)

EVAL_SEED, VALIDATION_SEED = 10_000, 20_000  # image k of the held-out (validation) prompts uses seed + k


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float | None,
    clamp_ratio: bool = False,
) -> torch.Tensor:
    """Per-sample policy-gradient loss ``−A·ratio``. With ``clip_range``: PPO's pessimistic clipped form, or with
    ``clamp_ratio`` DPOK's ``−A·clamp(ratio, 1 ± clip_range)``, which stops the gradient on either side."""
    ratio = torch.exp(log_prob - old_log_prob)
    if clip_range is None:
        return -advantages * ratio
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    if clamp_ratio:
        return -advantages * clipped
    return torch.maximum(-advantages * ratio, -advantages * clipped)


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in module.named_parameters() if "lora_" in name}


def tensors_to(expansions: GeneratedExpansions, device) -> GeneratedExpansions:
    moved = {f.name: getattr(expansions, f.name).to(device) for f in dataclasses.fields(expansions)
             if isinstance(getattr(expansions, f.name), torch.Tensor)}  # fmt: skip
    return dataclasses.replace(expansions, **moved)


def make_advantages(rewards: torch.Tensor, mode: str, clip: float, tracker: PerPromptStatTracker, key: str):
    """Reward signal of one group: raw rewards, or standardised over the batch or per prompt, then clipped."""
    if mode == "raw":
        return rewards
    finite = rewards[torch.isfinite(rewards)]
    normalised = standardise(rewards, finite) if mode == "batch" else tracker.normalise(key, rewards)
    return normalised.clamp(-clip, clip)


@dataclasses.dataclass
class Selection:
    """Pareto (or weighted-sum) selection over the global batch. The per-sample tensors are ``[processes, rows]``:
    row ``j`` of process ``r`` is that process's local sample ``j``, and every process holds all of them."""

    rewards: torch.Tensor  # [groups·N, K], all processes' samples, group-major
    front: torch.Tensor  # [groups·N] bool, group-major: the selected samples
    selected: torch.Tensor  # [processes, rows] bool
    advantages: torch.Tensor  # [processes, rows]
    weights: torch.Tensor  # [processes, rows]: each sample's share of the objective (sums to 1; 0 outside)


def selection_weights(selected: torch.Tensor, groups: int) -> torch.Tensor:
    """Each selected sample's share of the objective, group by group (``selected`` is group-major, ``groups`` equal
    groups): ``1 / (groups · |P_k|)`` in group k's front ``P_k``, so each group weighs ``1/groups`` whatever the size of
    its front (METHODS §2 takes each identifier's front ``P_k`` in its own step of the loop over rewards)."""
    per_group = selected.view(groups, -1).float()
    sizes = per_group.sum(dim=1, keepdim=True)
    return (per_group / (groups * sizes.clamp(min=1))).flatten()


class Trainer(TrainingRun):
    """Holds everything a run needs, so a checkpoint can be taken from one place."""

    resume_fixed = RESUME_FIXED

    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.accelerator = create_accelerator(config, self.output_dir)
        self.num_processes = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        if config.images_per_prompt % self.num_processes:
            raise ValueError(
                f"config `images_per_prompt` = {config.images_per_prompt} does not divide across "
                f"{self.num_processes} processes: use a multiple of {self.num_processes}."
            )
        self.local_images = config.images_per_prompt // self.num_processes
        checkpoint = self._checkpoint_to_resume()
        self._check_output_dir(checkpoint)
        self.prompts = read_prompts(config.prompts)
        self.eval_prompts = read_prompts(config.eval_prompts)
        self.validation_prompts = read_prompts(config.validation_prompts) if config.validate_every else []
        shared = sorted(set(self.validation_prompts) & set(self.eval_prompts))
        if shared:
            raise ValueError(
                f"config `validation_prompts` ({config.validation_prompts}) shares {len(shared)} prompt(s) with "
                f"`eval_prompts` ({config.eval_prompts}), e.g. {shared[0]!r}: the final table must score prompts that "
                "chose no iterate. Use separate files."
            )
        resuming_sft = checkpoint is not None and checkpoint[1]["expander_sft_sha256"] is not None
        load_sft_pairs = config.expander_sft_data and config.uses_expander and not resuming_sft
        self.sft_pairs = load_pairs(config.expander_sft_data) if load_sft_pairs else None
        options = config.reward_options or {}
        self.reward_fns = {name: resolve_reward(name, options.get(name)) for name in config.rewards}
        self.reward_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")

        self.device = self.accelerator.device
        self.rng = random.Random(config.seed)  # the same on every process: prompts, expansions, timesteps
        self.generator = torch.Generator(self.device).manual_seed(config.seed + self.rank)  # each its own samples
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every process

        self._load_base_pipeline()
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
        # The sampler being trained is DDIM with the run's steps; the pipeline samples with it too, so the sample
        # grids and the held-out table measure it (deterministically, eta 0), not the base repository's scheduler.
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.scheduler = self.scheduler
        self.identifiers = config.reward_identifiers or default_reward_identifiers(len(config.rewards))
        self.weights = torch.tensor(config.reward_weights or [1.0 / len(config.rewards)] * len(config.rewards))
        self.tracker = PerPromptStatTracker()
        self.iteration = 0
        self.sft_losses: list[float] = []
        self.expander_sft_sha256: str | None = checkpoint[1]["expander_sft_sha256"] if resuming_sft else None
        self._load_expander()
        self.optimizers, self.lr_schedulers = self._optimizers()
        self.history: list[dict] = []
        self.validation = RewardValidation(config.rewards, config.selection_rule, config.collapse_margin)
        self.best = BestIterate(config.patience)
        self.stopped_by: str | None = None  # "patience" or "collapse" when the run ended before its iterations
        self.reward_batches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.run_id = uuid.uuid4().hex
        self.stop_signal: int | None = None
        self.checkpointed_at: int | None = None

        self._begin(checkpoint, "parrot")
        self.validation_metrics = MetricsWriter(self.output_dir / "validation.jsonl")
        if self.accelerator.is_main_process and checkpoint is not None:
            self.validation_metrics.rewrite(self.validation.records)

    # ------------------------------------------------------------------------------------------------------------
    # Set-up, checkpoints and resume

    def _prepare_output_dir(self, resuming: bool) -> None:
        super()._prepare_output_dir(resuming)
        if resuming:
            return
        if self._sft_weights is not None:  # saved once: the supervised stage is not run again on resume
            self.checkpoints_dir.mkdir(exist_ok=True)
            path = self.checkpoints_dir / "expander_sft.safetensors"
            save_file(self._sft_weights, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
            self.expander_sft_sha256 = sha256_of(path)
        self._sft_weights = None

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly; called on every process."""
        return {
            **self.run_state(),
            "unet_lora": lora_parameters(self.pipe.unet),
            "expander_lora": lora_parameters(self.expander) if self.expander is not None else None,
            "expander_sft_sha256": self.expander_sft_sha256,
            "tracker": self.tracker.state_dict(),
            "sft_losses": self.sft_losses,
            "first_batch": self.reward_batches.get("first"),
            "validation": self.validation.state_dict(),
            "best": self.best.state_dict(),
            "stopped_by": self.stopped_by,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for module, saved in ((self.pipe.unet, state["unet_lora"]), (self.expander, state["expander_lora"])):
                if module is not None:
                    for name, parameter in lora_parameters(module).items():
                        parameter.copy_(saved[name])
        self.load_run_state(state)
        self.tracker.load_state_dict(state["tracker"])
        self.sft_losses = state["sft_losses"]
        if state["first_batch"] is not None:
            self.reward_batches["first"] = state["first_batch"]
        self.validation.load_state_dict(state["validation"])
        self.best.load_state_dict(state["best"])
        self.stopped_by = state["stopped_by"]

    def _load_expander(self) -> None:
        config = self.config
        self.expander = self.expander_tokenizer = None
        self.expander_config = None
        self._sft_weights = None
        self.expander_fine_tuned = False  # by the supervised stage: the bundle then holds the whole expander
        if not config.uses_expander:
            return
        source = str(default_tiny_expander()) if config.expander_model == "tiny" else config.expander_model
        model, tokenizer = load_expander(source, tokenizer=config.expander_tokenizer)
        self.expander_config = ExpanderConfig(
            base_model=source,
            template=config.expander_template or DEFAULT_TEMPLATE,
            max_new_tokens=config.expander_max_new_tokens,
        )
        model.to(self.device)
        if self.expander_sft_sha256 is not None:  # resuming: the supervised stage's weights, not the stage again
            path = self.checkpoints_dir / "expander_sft.safetensors"
            if not path.is_file() or sha256_of(path) != self.expander_sft_sha256:
                raise ValueError(f"{path}: missing or changed since the checkpoint was written; cannot resume.")
            model.load_state_dict(load_file(path, device=str(self.device)))
            self.expander_fine_tuned = True
        elif self.sft_pairs:
            # Once, on the main process, then sent to the others: every process expands with the same weights even
            # where their arithmetic differs. Its dropout draws from a forked RNG, so the processes' RNGs stay alike.
            if self.accelerator.is_main_process:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    self.sft_losses = supervised_finetune(
                        model, tokenizer, self.sft_pairs, self.expander_config,
                        epochs=config.expander_sft_epochs, learning_rate=config.expander_sft_learning_rate,
                        batch_size=config.expander_sft_batch_size, seed=config.seed,
                    )  # fmt: skip
            if self.num_processes > 1:
                for value in model.state_dict().values():
                    self._collective("sending the fine-tuned expander", broadcast, value, 0)
            self._sft_weights = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
            self.expander_fine_tuned = True
        model.requires_grad_(False)
        self.expander = add_lora(model, rank=config.expander_lora_rank)
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
        schedulers = {
            name: get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_iterations,
                                num_training_steps=config.iterations)  # fmt: skip
            for name, optimizer in optimizers.items()
        }
        return optimizers, schedulers

    # ------------------------------------------------------------------------------------------------------------
    # One iteration

    def branch_texts(self, prompt: str, expansion: str) -> list[str]:
        """The prompt of each sampled group: ``ĉ_k`` per reward in parrot mode, the prompt itself otherwise."""
        if self.config.mode == "parrot":
            return [compose_expanded_prompt([identifier], expansion) for identifier in self.identifiers]
        return [prompt]

    def sample(self, texts: list[str], on_chunk=None):
        """Trajectories of this process's share of the ``images_per_prompt`` samples of each text, in chunks of
        ``train_batch_size``; ``on_chunk(rows, images)`` is called with each chunk's decoded images as soon as they
        exist (training scores them there, in a worker thread, while the next chunk samples)."""
        config = self.config
        prompt_embeds, negative_embeds = encode_prompts(self.pipe, texts)
        prompt_embeds = prompt_embeds.repeat_interleave(self.local_images, dim=0)
        negative_embeds = negative_embeds.repeat_interleave(self.local_images, dim=0)
        chunks, images = [], []
        for start in range(0, len(prompt_embeds), config.train_batch_size):
            rows = slice(start, start + config.train_batch_size)
            with self.accelerator.autocast():
                chunk = sample_trajectories(
                    self.pipe, self.scheduler, prompt_embeds[rows], negative_embeds[rows],
                    num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    eta=config.eta, height=config.resolution, width=config.resolution, generator=self.generator,
                )  # fmt: skip
            chunks.append(chunk)
            images.append(decode_images(self.pipe, chunk.final_latents))
            if on_chunk is not None:
                on_chunk(rows, images[-1])
        return Trajectories.cat(chunks), torch.cat(images)

    def sample_and_score(self, prompt: str, texts: list[str]):
        """Sample every text's images and score them with all rewards: ``(trajectories, images, [rows, K])``.

        With ``reward_worker``, a chunk's rewards are computed in a worker thread while the next chunk samples
        (rewards on the CPU or on a device of their own then cost no sampling time)."""
        branch_prompts = [text for text in texts for _ in range(self.local_images)]
        metadata = {"original_prompts": [prompt] * len(branch_prompts), "expanded_prompts": branch_prompts}
        scored = []

        def score(rows: slice, images: torch.Tensor) -> None:
            chunk_metadata = {key: values[rows] for key, values in metadata.items()}
            scored.append(self.reward_worker.submit(score_images, self.reward_fns, images, [prompt] * len(images),
                                                    chunk_metadata))  # fmt: skip
            if not self.config.reward_worker_overlap:
                scored[-1].result()

        trajectories, images = self.sample(texts, on_chunk=score)
        return trajectories, images, torch.cat([future.result() for future in scored])

    def select(self, prompt: str, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which samples train, their advantages and weights. ``rewards`` is the global ``[groups·N, K]``,
        group-major. Parrot mode: each identifier's group keeps its own non-dominated samples, advantaged by that
        identifier's reward; the other modes: every finite sample, advantaged by the weighted sum."""
        config = self.config
        n = config.images_per_prompt
        if config.mode == "parrot":
            groups = len(self.identifiers)
            selected = torch.zeros(len(rewards), dtype=torch.bool)
            advantages = torch.zeros(len(rewards))
            for k in range(groups):
                group = slice(k * n, (k + 1) * n)
                selected[group] = non_dominated_mask(rewards[group])
                advantages[group] = make_advantages(
                    rewards[group, k], config.advantage, config.advantage_clip, self.tracker, f"{prompt}\x00{k}"
                )
        else:
            groups = 1
            combined = rewards @ self.weights
            selected = torch.isfinite(combined)
            advantages = make_advantages(combined, config.advantage, config.advantage_clip, self.tracker, prompt)
        advantages = torch.where(selected, advantages, torch.zeros_like(advantages))
        return selected, advantages, selection_weights(selected, groups)

    def select_global(self, prompt: str, local_rewards: torch.Tensor) -> Selection:
        """Gather every process's rewards and select over the whole batch (the same result on every process). Rows
        are ``[group, sample]`` locally and ``[process, group, sample]`` gathered; selection wants each group's
        samples of all processes together."""
        world, rows = self.num_processes, len(local_rewards)
        groups = rows // self.local_images
        gathered = self._collective(
            "gathering rewards", self.accelerator.gather, local_rewards.to(self.device)
        ).cpu()

        def group_major(tensor):
            return tensor.view(world, groups, self.local_images, *tensor.shape[1:]).transpose(0, 1).flatten(0, 2)

        def by_process(tensor):
            return tensor.view(groups, world, self.local_images).transpose(0, 1).reshape(world, rows)

        rewards = group_major(gathered)
        selected, advantages, weights = self.select(prompt, rewards)
        return Selection(rewards, selected, by_process(selected), by_process(advantages), by_process(weights))

    def t2i_update(self, trajectories: Trajectories, selection: Selection) -> dict:
        """Policy-gradient passes over this process's selected samples, on DDPO's schedule.

        Each of ``num_inner_epochs`` epochs shuffles every process's selected samples into minibatches of
        ``train_batch_size``; a minibatch accumulates its gradient over its trained timesteps (a random subset of
        ``timestep_fraction`` per sample); an optimiser step follows every ``gradient_accumulation_steps``
        minibatches (null: one step per epoch, the paper's one step per batch). After the first step the
        recomputed log-probs leave the sampling ones, and ``clip_range`` bounds the update.

        A step's loss is ``Σ w_i·ℓ_i / Σ w_i`` over the samples it holds on every process (``w``: the selection's
        weights, ``ℓ_i``: the mean over its timesteps), so one step per epoch follows exactly the objective and a
        minibatch step its share, at the same scale. The shuffles come from the run's shared RNG, so every process
        knows every step's samples; each takes as many steps as the process with the most minibatches (one out of
        samples adds zero gradient to the all-reduce).
        """
        config = self.config
        world, rows = selection.selected.shape
        num_steps = trajectories.log_probs.shape[1]
        trained_steps = max(1, round(config.timestep_fraction * num_steps))
        size = config.train_batch_size
        fronts = [selection.selected[r].nonzero().squeeze(1) for r in range(world)]
        num_minibatches = max(math.ceil(len(front) / size) for front in fronts)
        per_step = config.gradient_accumulation_steps or num_minibatches
        totals = torch.zeros(4, dtype=torch.float64)  # loss, kl, clipped (sample, timestep) pairs, all pairs
        ratio_deviation, stepped = [], []
        for _ in range(config.num_inner_epochs):
            shuffler = torch.Generator().manual_seed(self.rng.randrange(2**63))
            timestep_subsets = torch.rand(world, rows, num_steps, generator=shuffler).argsort(dim=2)[..., :trained_steps]
            orders = [front[torch.randperm(len(front), generator=shuffler)] for front in fronts]
            minibatches = [[order[m * size : (m + 1) * size] for order in orders] for m in range(num_minibatches)]
            for first in range(0, num_minibatches, per_step):
                step_minibatches = minibatches[first : first + per_step]
                step_weight = sum(selection.weights[r, mb[r]].sum() for mb in step_minibatches for r in range(world))
                self.optimizers["unet"].zero_grad(set_to_none=True)
                for minibatch in step_minibatches:
                    index = minibatch[self.rank]
                    if len(index) == 0:
                        continue
                    batch = trajectories.select(index.to(trajectories.latents.device))
                    scale = (selection.weights[self.rank, index] / (step_weight * trained_steps)).to(self.device)
                    advantages = selection.advantages[self.rank, index].to(self.device)
                    deviation = 0.0
                    for position in range(trained_steps):
                        steps = timestep_subsets[self.rank, index, position].to(trajectories.latents.device)
                        partial, ratio = self._policy_gradient(batch, advantages, scale, steps)
                        totals += partial
                        deviation = max(deviation, (ratio - 1).abs().max().item())
                    ratio_deviation.append(deviation)
                stepped.append(self._optimizer_step("unet"))
        if self.num_processes > 1:
            totals = self._collective("summing loss statistics", self.accelerator.reduce, totals.to(self.device), "sum").cpu()
        loss, kl, clipped, pairs = totals.tolist()
        return {"loss": loss / len(stepped), "kl": kl / max(pairs, 1), "clipped_fraction": clipped / max(pairs, 1),
                "optimizer_steps": len(stepped), "skipped": not all(stepped),
                "ratio_deviation": ratio_deviation}  # fmt: skip

    def _policy_gradient(self, batch: Trajectories, advantages: torch.Tensor, scale: torch.Tensor, steps: torch.Tensor):
        """Backward of one stored step per sample (``steps``), each sample's loss weighted by ``scale``. Returns the
        (loss, kl sum, clipped count, samples) it adds and the PPO ratios."""
        config = self.config
        with self.accelerator.autocast():
            log_prob, noise = recompute_log_prob(
                self.pipe.unet, self.scheduler, batch, steps, guidance_scale=config.guidance_scale, eta=config.eta
            )
            old_log_prob = batch.log_probs.gather(1, steps[:, None]).squeeze(1)
            loss_per_sample = config.reward_scale * policy_loss(
                log_prob, old_log_prob, advantages, config.clip_range, clamp_ratio=config.mode == "dpok"
            )
            kl_sum = 0.0
            if config.kl_beta > 0:
                kl = self.kl_to_pretrained(batch, steps, noise)
                loss_per_sample = loss_per_sample + config.kl_beta * kl
                kl_sum = kl.sum().item()
        loss = (loss_per_sample * scale).sum()
        self.accelerator.backward(loss)
        ratio = torch.exp(log_prob.detach() - old_log_prob)
        clipped = ((ratio - 1).abs() > config.clip_range).float().sum().item() if config.clip_range is not None else 0.0
        return torch.tensor([loss.item(), kl_sum, clipped, len(advantages)], dtype=torch.float64), ratio

    def kl_to_pretrained(self, batch: Trajectories, steps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DPOK's per-step KL term: squared distance of the guided predictions of the policy and the pretrained UNet
        (the two Gaussians share their variance, so the KL is proportional to it)."""
        rows = torch.arange(len(steps), device=steps.device)
        with torch.no_grad(), adapters_disabled(self.pipe.unet):
            reference = guided_noise(
                self.pipe.unet, self.scheduler, batch.latents[rows, steps], batch.timesteps.to(steps.device)[steps],
                batch.prompt_embeds, batch.negative_embeds, self.config.guidance_scale,
            )  # fmt: skip
        return ((noise.float() - reference.float()) ** 2).mean(dim=tuple(range(1, noise.ndim)))

    def expander_loss_and_step(self, expansions, selection: Selection) -> float:
        """REINFORCE on the expansion (METHODS §2, step 5): ``−(Σ_{j∈P} A_j) · log p_φ(ĉ | c)``, summed over every
        identifier's front as the formula has it; each process weighs by its own rows, so the summed gradients are
        the global loss's."""
        weight = selection.advantages[self.rank][selection.selected[self.rank]].sum()
        log_prob = continuation_log_probs(
            self.expander, expansions.input_ids, expansions.attention_mask, expansions.new_tokens, expansions.new_mask,
            expansions.support, self.expander_config.temperature,
        )  # fmt: skip
        loss = -(weight.to(log_prob.device) * log_prob).sum()
        self.optimizers["expander"].zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        stepped = self._optimizer_step("expander")
        loss = self._collective("summing the expander loss", self.accelerator.reduce, loss.detach(), "sum")
        return loss.item() if stepped else float("nan")

    def expand(self, prompt: str) -> GeneratedExpansions:
        """This iteration's ``ĉ`` with what its REINFORCE term needs, generated on the main process and sent to the
        others, so every process trains on the same text even where their arithmetic differs (GPUs)."""
        seed = self.rng.randrange(2**31)
        expansions = None
        if self.accelerator.is_main_process:
            expansions = generate_expansions(self.expander, self.expander_tokenizer, [prompt], self.expander_config,
                                             seed=seed, record_support=True)  # fmt: skip
        if self.num_processes == 1:
            return expansions
        sent = [expansions and tensors_to(expansions, "cpu")]  # pickled: a CUDA tensor would come back on GPU 0
        self._collective("sending the expansion", broadcast_object_list, sent)
        return tensors_to(sent[0], self.device)

    def train_iteration(self) -> dict:
        config = self.config
        started = time.perf_counter()
        prompt = self.rng.choice(self.prompts)
        expansions = None
        if self.expander is not None:
            expansions = self.expand(prompt)
            expansion = expansions.texts[0]
        else:
            expansion = prompt
        trajectories, _, local_rewards = self.sample_and_score(prompt, self.branch_texts(prompt, expansion))
        selection = self.select_global(prompt, local_rewards)
        rewards, selected = selection.rewards, selection.front

        record = {"iteration": self.iteration, "prompt": prompt, "expanded_prompt": expansion}
        finite_rows = torch.isfinite(rewards).all(dim=1)
        for k, name in enumerate(config.rewards):
            column = rewards[:, k][torch.isfinite(rewards[:, k])]
            record[f"reward/{name}"] = column.mean().item() if len(column) else float("nan")
        record["front_fraction"] = selected.float().mean().item()
        record["nonfinite_samples"] = int((~finite_rows).sum())
        if selected.any():
            if config.train_unet:
                stats = self.t2i_update(trajectories, selection)
                record.update({"loss/t2i": stats["loss"], "kl": stats["kl"], "skipped": stats["skipped"],
                               "optimizer_steps": stats["optimizer_steps"]})  # fmt: skip
                if config.clip_range is not None:
                    record["clipped_fraction"] = stats["clipped_fraction"]
            if "expander" in self.optimizers:
                record["loss/expander"] = self.expander_loss_and_step(expansions, selection)
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
        if self.expander_fine_tuned:
            return copy.deepcopy(self.expander).merge_and_unload()
        return self.expander

    @torch.no_grad()
    def generate(
        self, prompts: list[str], trained: bool, seed: int, identifiers: list[int] | None = None,
        images_per_prompt: int | None = None,
    ) -> tuple[torch.Tensor, list[str]]:  # fmt: skip
        """Images of the trained model (expansion, identifiers, original-prompt-centred guidance) or of the base
        model (plain CFG, LoRA off) through ParrotPipeline, float ``[N, 3, H, W]`` in [0, 1]. ``identifiers``: the
        rewards whose identifiers the trained model's ``ĉ`` carries (indices; default all); ``images_per_prompt``:
        default ``eval_images_per_prompt``."""
        config = self.config
        pipe = self.pipe
        pipe.register_modules(expander=self.expander if trained else None, expander_tokenizer=self.expander_tokenizer)
        pipe.expander_config = self.expander_config or ExpanderConfig()
        pipe.parrot_config = self.parrot_config() if trained else None
        repeated = [p for p in prompts for _ in range(images_per_prompt or config.eval_images_per_prompt)]
        generators = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(repeated))]
        kwargs = dict(
            guidance_scale=config.guidance_scale, num_inference_steps=config.num_inference_steps,
            height=config.resolution, width=config.resolution, output_type="pt", eta=0.0,
        )  # fmt: skip
        images, texts = [], []
        for start in range(0, len(repeated), config.train_batch_size):
            chunk = slice(start, start + config.train_batch_size)
            if trained:
                out = pipe(repeated[chunk], generator=generators[chunk], reward_identifiers=identifiers,
                           expansion_guidance_scale=pipe.parrot_config.expansion_guidance_scale, **kwargs)  # fmt: skip
            else:
                with adapters_disabled(pipe.unet):
                    out = pipe(repeated[chunk], generator=generators[chunk], expansion_guidance_scale=0.0, **kwargs)
            images.append(out.images.float().cpu())
            texts.extend(out.expanded_prompts or repeated[chunk])
        pipe.register_modules(expander=None, expander_tokenizer=None)
        return torch.cat(images), texts

    def score(self, prompts: list[str], trained: bool, seed: int, images_per_prompt: int, grid: Path,
              identifiers: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """Reward matrix ``[prompts × images_per_prompt, K]`` of :meth:`generate`'s images; their grid goes to ``grid``."""
        images, texts = self.generate(prompts, trained, seed, identifiers, images_per_prompt)
        save_grid(images, grid, columns=images_per_prompt)
        repeated = [p for p in prompts for _ in range(images_per_prompt)]
        return score_images(self.reward_fns, images, repeated, {"original_prompts": repeated, "expanded_prompts": texts})

    def eval_rewards(self, trained: bool, identifiers: list[int] | None = None, label: str | None = None) -> torch.Tensor:
        """Reward matrix ``[prompts × eval_images_per_prompt, K]`` of the held-out prompts, fixed seeds; the grid is
        ``samples/eval_{label}.png`` (default: trained or base, and the identifiers)."""
        if label is None:
            label = ("trained" if trained else "base") + ("" if identifiers is None else f"_ids{'-'.join(map(str, identifiers))}")
        n = self.config.eval_images_per_prompt
        return self.score(self.eval_prompts, trained, EVAL_SEED, n, self.output_dir / "samples" / f"eval_{label}.png",
                          identifiers)  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # Validation: the selected iterate, early stopping, the collapse guard

    def validate(self) -> dict:
        """The validation prompts' rewards (fixed seeds, the trained sampler) for the model as it is now, the base
        model at iteration 0, as the final table samples both: each reward's mean and the hypervolume on the base
        validation's scale. Computed on the main process and sent to the others."""
        record = None
        if self.accelerator.is_main_process:
            n = self.config.validation_images_per_prompt
            grid = self.output_dir / "samples" / f"validation_{self.iteration:05d}.png"
            rewards = self.score(self.validation_prompts, self.iteration > 0, VALIDATION_SEED, n, grid)
            record = self.validation.record(self.iteration, rewards)
        if self.num_processes > 1:
            record, self.validation.scale = self._collective(
                "sharing the validation", broadcast_object_list, [record, self.validation.scale]
            )
        return record

    def trained_state(self) -> dict:
        """A copy of what training changes: the LoRA weights and the optimisers' moments (not their learning rates)."""
        weights = {"unet": lora_parameters(self.pipe.unet)}
        if self.expander is not None:
            weights["expander"] = lora_parameters(self.expander)
        return {
            "weights": {part: {name: p.detach().cpu().clone() for name, p in named.items()} for part, named in weights.items()},
            "moments": {name: copy.deepcopy(optimizer.state_dict()["state"]) for name, optimizer in self.optimizers.items()},
        }  # fmt: skip

    def load_trained_state(self, state: dict, moments: bool = True) -> None:
        modules = {"unet": self.pipe.unet, "expander": self.expander}
        with torch.no_grad():
            for part, saved in state["weights"].items():
                for name, parameter in lora_parameters(modules[part]).items():
                    parameter.copy_(saved[name])
        if moments:
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict({**optimizer.state_dict(), "state": state["moments"][name]})

    def after_validation(self, record: dict) -> None:
        """Log a validation, offer it to the selection, and guard against a collapsed reward (``collapse_action``)."""
        config = self.config
        self.validation.add(record)
        if self.iteration > 0:
            if config.selection_rule != "last":
                record["new_best"] = self.best.offer(self.iteration, self.validation.score(record), self.trained_state)
            reasons = self.validation.collapsed(record)
            if reasons:
                record["collapsed"] = list(reasons)
                logger.warning("collapse guard, iteration %d: %s (collapse_action: %s).", self.iteration,
                               "; ".join(reasons.values()), config.collapse_action)  # fmt: skip
                if config.collapse_action == "stop":
                    self.stopped_by = "collapse"
                elif config.collapse_action == "rollback":
                    record["rolled_back_to"] = self.rollback()
            if self.best.patience_exhausted():
                self.stopped_by = "patience"
        if self.accelerator.is_main_process:
            self.validation_metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k.startswith("validation/")}, step=self.iteration)

    def rollback(self) -> int:
        """Back to the best iterate's weights and moments, every learning rate × ``rollback_lr_factor`` from now on.
        Returns the iterate."""
        self.load_trained_state(self.best.snapshot)
        for name, optimizer in self.optimizers.items():
            scale_learning_rates(optimizer, self.lr_schedulers[name], self.config.rollback_lr_factor)
        logger.warning("rolled back to iteration %d; learning rates × %g", self.best.iteration,
                       self.config.rollback_lr_factor)  # fmt: skip
        return self.best.iteration

    @property
    def selected_iteration(self) -> int:
        """The iterate the bundle is: the best validation's, or the last one without selection."""
        if self.config.validate_every and self.config.selection_rule != "last" and self.best.iteration is not None:
            return self.best.iteration
        return self.iteration

    def evaluate(self) -> dict:
        """Held-out prompts: the base model, the bundle's iterate ("trained") and, when validation selected an earlier
        one, the last iterate; each reward's mean and the hypervolume of the reward vectors, on one scale. Leaves
        the selected iterate's weights in place."""
        matrices = {"base": self.eval_rewards(trained=False)}
        if self.selected_iteration != self.iteration:
            matrices["last"] = self.eval_rewards(trained=True, label="last")
            self.load_trained_state(self.best.snapshot, moments=False)
        matrices["trained"] = self.eval_rewards(trained=True)
        compared = compare_reward_sets(matrices, self.config.rewards)
        results = {"base": compared["base"], "trained": {**compared["trained"], "iteration": self.selected_iteration}}
        if "last" in compared:
            results["last"] = {**compared["last"], "iteration": self.iteration}
        if self.validation.records:
            results["selection"] = {"select_by": self.config.selection_rule, "iteration": self.selected_iteration,
                                    "last_iteration": self.iteration, "stopped_by": self.stopped_by,
                                    "validations": self.validation.records}  # fmt: skip
        return results

    def save_bundle(self, card_sections: str = "", gallery: list[tuple[str, Path]] = ()) -> Path:
        expander = self._bundle_expander()
        config = self.parrot_config()
        if expander is not None and self.expander_fine_tuned:  # the bundle holds the whole expander: no base model needed
            config.expander = dataclasses.replace(self.expander_config, base_model=None)
        return save_bundle(
            self.output_dir / "bundle",
            unet=self.pipe.unet,
            config=config,
            expander=expander,
            expander_tokenizer=self.expander_tokenizer if expander is not None else None,
            card_sections=card_sections,
            gallery=gallery,
            overwrite=True,
        )

    def train_loop(self) -> None:
        """The iterations left, with validations (and what they decide), metrics, TensorBoard scalars, a progress
        bar, sample grids and checkpoints.

        On SIGTERM/SIGINT the current iteration finishes, a checkpoint is written and the process exits with
        128 + the signal number; a second signal stops at once.
        """
        config = self.config
        if self.sft_losses and self.accelerator.is_main_process:
            print(f"expander supervised stage: loss {self.sft_losses[0]:.3f} → {self.sft_losses[-1]:.3f}")
        if config.validate_every and not self.validation.records:
            self.after_validation(self.validate())  # the base model: the run's "before"
        progress = tqdm(total=config.iterations, initial=self.iteration, desc=config.mode,
                        disable=not self.accelerator.is_main_process)  # fmt: skip
        with self.stop_on_signals():
            while self.iteration < config.iterations and self.stopped_by is None:
                record = self.train_iteration()
                self.step_lr_schedulers()
                self.history.append(record)
                if self.accelerator.is_main_process:
                    self.metrics.write(record)
                self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=self.iteration)
                progress.update()
                progress.set_postfix(
                    {name.split("/")[1][:12]: f"{record[name]:.3g}" for name in record if name.startswith("reward/")}
                    | {"front": f"{record['front_fraction']:.2f}"}
                )
                self.iteration += 1
                if config.validate_every and (self.iteration % config.validate_every == 0
                                              or self.iteration == config.iterations):  # fmt: skip
                    self.after_validation(self.validate())
                if config.checkpoint_every and self.iteration % config.checkpoint_every == 0:
                    self.save_checkpoint()
                eval_due = config.eval_every and self.iteration % config.eval_every == 0
                if eval_due and self.iteration < config.iterations and self.accelerator.is_main_process:
                    images, _ = self.generate(self.eval_prompts[:4], trained=True, seed=EVAL_SEED)
                    save_grid(images, self.output_dir / "samples" / f"iter_{self.iteration:05d}.png",
                              columns=config.eval_images_per_prompt)  # fmt: skip
                if self._stop_requested():
                    self._stop_with_checkpoint(progress)
        progress.close()
        if self.stopped_by is not None and self.accelerator.is_main_process:
            reason = {"patience": f"{config.patience} validations without a new best",
                      "collapse": "a reward collapsed (collapse_action: stop)"}[self.stopped_by]  # fmt: skip
            print(f"stopped at iteration {self.iteration} of {config.iterations}: {reason}")
        if self.checkpointed_at != self.iteration:
            self.save_checkpoint()

    def run(self) -> dict:
        """Train, evaluate on held-out prompts (base, the selected iterate and the last), write the selected
        iterate's bundle (with its model card) and the plots, and push the bundle to the Hub when asked. The main
        process does all after training."""
        config = self.config
        self.train_loop()
        results: dict = {}
        if self.accelerator.is_main_process:
            results = self.evaluate()
            plots = self.output_dir / "plots"
            caption = f"trained model (iteration {self.selected_iteration}), held-out prompts: {', '.join(self.eval_prompts[:4])}"
            gallery = [(caption, self.output_dir / "samples" / "eval_trained.png")]
            if self.validation.records:
                series = {name: f"validation/{name}" for name in config.rewards}
                if len(config.rewards) > 1:
                    series["hypervolume"] = "validation/hypervolume"
                plot_validation(self.validation.records, series, self.selected_iteration, plots / "validation.png")
                gallery.append((f"validation curve; the bundle is iteration {self.selected_iteration}",
                                plots / "validation.png"))  # fmt: skip
            bundle = self.save_bundle(model_card_sections(config, results), gallery)
            plot_rewards(self.history, config.rewards, plots / "rewards.png")
            plot_pareto(self.reward_batches, config.rewards, plots / "pareto.png")
            (self.output_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
            print(evaluation_table(results, config.rewards))
            print(f"(held-out prompts, sampled with the trained sampler: DDIM, {config.num_inference_steps} steps, eta 0)")
            print(f"bundle: {bundle} (iteration {self.selected_iteration})")
            if config.push_to_hub:
                results["hub"] = self.push(bundle)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return results


def train(config: TrainConfig) -> dict:
    return Trainer(config).run()
