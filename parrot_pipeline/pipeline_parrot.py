"""ParrotPipeline: Stable Diffusion with prompt expansion, reward identifiers and original-prompt-centred guidance."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bundle import (
    DEFAULT_EXPANSION_GUIDANCE_SCALE,
    DEFAULT_GUIDANCE_SCALE,
    ParrotConfig,
    check_lora_fits,
    check_scale,
    default_reward_identifiers,
    read_bundle,
    save_bundle,
)
from .expansion import ExpanderConfig, compose_expanded_prompt, expand_prompts, load_expander
from .guidance import parrot_guidance

ADAPTER_NAME = "parrot"


@dataclass
class ParrotPipelineOutput(StableDiffusionPipelineOutput):
    """``images`` and ``nsfw_content_detected`` as in Stable Diffusion, plus ``expanded_prompts``: the full text of
    the expanded branch for each prompt (identifiers included), or ``None`` when no expanded branch was used."""

    expanded_prompts: list[str] | None = None


class ParrotPipeline(StableDiffusionPipeline):
    r"""Text-to-image generation with Parrot's prompt expansion and original-prompt-centred guidance.

    A [`StableDiffusionPipeline`] (SD 1.x and 2.x, epsilon or v-prediction) with two optional components:
    ``expander``, a transformers causal LM that expands the prompt, and ``expander_tokenizer``. Each step computes

        ε∅ + w1·(ε(c) − ε∅) + w2·(ε(ĉ) − ε∅)

    with ``c`` the prompt, ``ĉ`` the reward identifiers followed by the expansion, ``w1 = guidance_scale`` and
    ``w2 = expansion_guidance_scale``; the three branches go through the UNet in one batched call. Without an
    expanded branch (``w2 = 0``, or no expander, expansion or identifiers) it is exactly Stable Diffusion's CFG.

    It inherits diffusers' loaders: ``load_lora_weights``, ``load_textual_inversion``, ``from_single_file``.
    """

    model_cpu_offload_seq = "expander->text_encoder->image_encoder->unet->vae"
    _optional_components = StableDiffusionPipeline._optional_components + ["expander", "expander_tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        expander: PreTrainedModel | PeftModel | None = None,
        expander_tokenizer: PreTrainedTokenizerBase | None = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(expander=expander, expander_tokenizer=expander_tokenizer)
        self.expander_config = ExpanderConfig(base_model=getattr(expander, "name_or_path", None) or None)
        self.parrot_config: ParrotConfig | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    def load_expander(
        self,
        path_or_repo_id: str | os.PathLike,
        expander_config: ExpanderConfig | None = None,
        **kwargs,
    ) -> None:
        """Load a causal LM and its tokenizer (plus a peft adapter if the folder holds one) as the expander.

        ``expander_config`` sets the instruction template and generation settings (default: the paper's
        instruction); its ``base_model`` is filled in with the model loaded here.
        """
        model, tokenizer = load_expander(path_or_repo_id, torch_dtype=self.text_encoder.dtype, **kwargs)
        base_model = model.active_peft_config.base_model_name_or_path if isinstance(model, PeftModel) else str(path_or_repo_id)
        config = dataclasses.replace(expander_config or ExpanderConfig(), base_model=base_model)
        self._set_expander(model, tokenizer, config)

    def _set_expander(self, model, tokenizer, config: ExpanderConfig) -> None:
        self.register_modules(expander=model.to(self.text_encoder.device), expander_tokenizer=tokenizer)
        self.expander_config = config

    def load_parrot_weights(self, path_or_repo_id: str | os.PathLike, **hub_kwargs) -> None:
        """Load a Parrot bundle: the UNet LoRA (adapter ``"parrot"``), the expander and the bundle's settings.

        Everything is read and checked before the pipeline changes, so a bad bundle leaves the pipeline as it was.
        A previously loaded bundle is replaced.
        """
        bundle = read_bundle(path_or_repo_id, **hub_kwargs)
        check_lora_fits(self.unet, bundle.lora_state_dict, bundle.config.base_model, repr(str(path_or_repo_id)))
        expander = bundle.load_expander(torch_dtype=self.text_encoder.dtype) if bundle.has_expander else None

        if ADAPTER_NAME in (getattr(self.unet, "peft_config", None) or {}):
            self.delete_adapters(ADAPTER_NAME)
        self.load_lora_into_unet(
            bundle.lora_state_dict, network_alphas=None, unet=self.unet, adapter_name=ADAPTER_NAME, _pipeline=self,
            metadata=bundle.lora_metadata,
        )  # fmt: skip
        if expander is not None:
            self._set_expander(*expander, bundle.config.expander)
        self.parrot_config = bundle.config

    def save_parrot_weights(
        self,
        save_directory: str | os.PathLike,
        reward_names: list[str],
        reward_identifiers: list[str] | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        expansion_guidance_scale: float = DEFAULT_EXPANSION_GUIDANCE_SCALE,
        base_model: str | None = None,
        adapter_name: str | None = None,
        method: str = "parrot",
        extra: dict | None = None,
        overwrite: bool = False,
    ):
        """Write a Parrot bundle from the LoRA adapter now on ``unet`` and the expander (with its adapter, if any).

        ``reward_identifiers`` defaults to ``<reward 1>`` … ``<reward K>``; ``base_model`` to the model this
        pipeline was loaded from.
        """
        base_model = str(base_model or self.name_or_path or "")
        if not base_model:
            raise ValueError("`base_model` is required: this pipeline was not loaded from a named model.")
        config = ParrotConfig(
            base_model=base_model,
            reward_names=list(reward_names),
            reward_identifiers=list(reward_identifiers or default_reward_identifiers(len(reward_names))),
            guidance_scale=guidance_scale,
            expansion_guidance_scale=expansion_guidance_scale,
            expander=self.expander_config if self.expander is not None else None,
            method=method,
            extra=extra or {},
        )
        return save_bundle(
            save_directory,
            unet=self.unet,
            config=config,
            adapter_name=adapter_name,
            expander=self.expander,
            expander_tokenizer=self.expander_tokenizer,
            overwrite=overwrite,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Prompt expansion

    def expand_prompts(self, prompts: list[str], seed: int | None = None) -> list[str]:
        """Expand prompts with the expander (batched); only the newly generated text is returned."""
        if self.expander is None:
            raise ValueError("No expander is loaded; use `load_expander(...)` or `load_parrot_weights(...)`.")
        return expand_prompts(self.expander, self.expander_tokenizer, prompts, self.expander_config, seed=seed)

    def selected_identifiers(self, reward_identifiers) -> list[str]:
        """Resolve ``reward_identifiers`` (None: all of the bundle; indices or reward names; []: none)."""
        if reward_identifiers is None:
            return list(self.parrot_config.reward_identifiers) if self.parrot_config else []
        if isinstance(reward_identifiers, (str, int)):
            reward_identifiers = [reward_identifiers]
        if len(reward_identifiers) == 0:
            return []
        if self.parrot_config is None:
            raise ValueError(
                "`reward_identifiers` needs a loaded Parrot bundle (`load_parrot_weights`); pass None or [] without one."
            )
        return self.parrot_config.select_identifiers(reward_identifiers)

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def check_parrot_inputs(
        self,
        prompts: list[str],
        negative_prompt,
        expanded_prompt,
        guidance_scale,
        expansion_guidance_scale,
        num_images_per_prompt,
    ) -> None:
        if not all(isinstance(p, str) for p in prompts) or not prompts:
            raise TypeError("`prompt` must be a string or a non-empty list of strings.")
        for name, value in (("negative_prompt", negative_prompt), ("expanded_prompt", expanded_prompt)):
            if isinstance(value, list) and len(value) != len(prompts):
                raise ValueError(
                    f"`{name}` has {len(value)} entries but `prompt` has {len(prompts)}; pass one per prompt or a "
                    "single string."
                )
            if value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"`{name}` must be None, a string or a list of strings, got {type(value).__name__}.")
        check_scale("guidance_scale", guidance_scale)
        check_scale("expansion_guidance_scale", expansion_guidance_scale)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer ≥ 1, got {num_images_per_prompt!r}.")
        # Loaders inherited from StableDiffusionPipeline that change what the UNet needs at each step.
        if self.unet.config.encoder_hid_dim_type == "ip_image_proj":
            raise ValueError("ParrotPipeline does not support IP-Adapter; remove it with `pipe.unload_ip_adapter()`.")
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError(
                "ParrotPipeline does not support UNets with a guidance embedding (`time_cond_proj_dim`, e.g. LCM "
                "distillations); use a Stable Diffusion 1.x/2.x UNet."
            )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        expanded_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        expansion_guidance_scale: float | None = None,
        reward_identifiers: list[int | str] | None = None,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ):
        r"""Generate images.

        Args:
            prompt: the user's prompt(s) ``c``.
            negative_prompt: replaces the empty prompt ``∅`` of the unconditional branch.
            expanded_prompt: the expansion text to use verbatim for each prompt (the expander is not run).
            guidance_scale: ``w1``, on the original prompt. Default: the loaded bundle's, else 5.
            expansion_guidance_scale: ``w2``, on the expanded prompt; 0 gives plain classifier-free guidance.
                Default: the loaded bundle's, else 5.
            reward_identifiers: which identifiers of the loaded bundle to prepend: None for all, a list of indices
                or reward names for a subset (shifting the trade-off toward those rewards), ``[]`` for none.
            generator: also seeds the expansion (with its ``initial_seed()``), so a seed fixes text and images.

        The expanded branch is used when ``w2 > 0`` and there is something to expand with: an
        ``expanded_prompt``, an expander, or identifiers (a bundle trained without expansion: ``ĉ`` is the
        identifiers followed by the prompt). The other arguments are those of ``StableDiffusionPipeline``.

        Returns:
            [`ParrotPipelineOutput`], or the tuple ``(images, nsfw_content_detected, expanded_prompts)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        bundle = self.parrot_config
        if guidance_scale is None:
            guidance_scale = bundle.guidance_scale if bundle else DEFAULT_GUIDANCE_SCALE
        if expansion_guidance_scale is None:
            expansion_guidance_scale = bundle.expansion_guidance_scale if bundle else DEFAULT_EXPANSION_GUIDANCE_SCALE
        prompts = [prompt] if isinstance(prompt, str) else prompt
        self.check_parrot_inputs(
            prompts, negative_prompt, expanded_prompt, guidance_scale, expansion_guidance_scale, num_images_per_prompt
        )
        self.check_inputs(
            prompts, height, width, None, negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        identifiers = self.selected_identifiers(reward_identifiers)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = None
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        batch_size = len(prompts)

        # 2. Expand prompts: ĉ = identifiers, expansion
        use_expansion = expansion_guidance_scale > 0 and (
            expanded_prompt is not None or self.expander is not None or bool(identifiers)
        )
        expanded_prompts = None
        if use_expansion:
            if isinstance(expanded_prompt, str):
                expansions = [expanded_prompt] * batch_size
            elif expanded_prompt is not None:
                expansions = expanded_prompt
            elif self.expander is not None:
                first_generator = generator[0] if isinstance(generator, list) else generator
                seed = first_generator.initial_seed() if first_generator is not None else None
                expansions = self.expand_prompts(prompts, seed=seed)
            else:
                expansions = prompts
            expanded_prompts = [compose_expanded_prompt(identifiers, text) for text in expansions]

        # 3. Encode prompts; branches in UNet batch order [∅ or negative, c, ĉ]
        do_guidance = use_expansion or self.do_classifier_free_guidance
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompts, device, num_images_per_prompt, do_guidance, negative_prompt, lora_scale=lora_scale
        )
        branches = [negative_prompt_embeds, prompt_embeds] if do_guidance else [prompt_embeds]
        if use_expansion:
            expanded_embeds, _ = self.encode_prompt(
                expanded_prompts, device, num_images_per_prompt, False, lora_scale=lora_scale
            )
            branches.append(expanded_embeds)
        num_branches = len(branches)
        prompt_embeds = torch.cat(branches)

        # 4. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)

        # 5. Latents
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * num_branches) if num_branches > 1 else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]
                if do_guidance:
                    noise_uncond, noise_original, *noise_expanded = noise_pred.chunk(num_branches)
                    noise_pred = parrot_guidance(
                        noise_uncond,
                        noise_original,
                        noise_expanded[0] if noise_expanded else None,
                        guidance_scale,
                        expansion_guidance_scale,
                    )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 7. Decode
        if output_type == "latent":
            image, has_nsfw_concept = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()

        if not return_dict:
            return image, has_nsfw_concept, expanded_prompts
        return ParrotPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept, expanded_prompts=expanded_prompts)
