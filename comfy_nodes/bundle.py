"""A Parrot bundle inside ComfyUI: the UNet LoRA through ComfyUI's LoRA loader, the expander under its model
management. Imported when a Parrot node first runs (it needs ComfyUI)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.utils
import torch
from transformers import PreTrainedTokenizerBase

from parrot_pipeline.bundle import CONFIG_NAME, KOHYA_WEIGHT_NAME, Bundle, ParrotConfig, read_bundle
from parrot_pipeline.expansion import compose_expanded_prompt, expand_prompts


def check_lora_fits(model, lora: dict[str, torch.Tensor], config: ParrotConfig, name: str) -> None:
    """Refuse a kohya LoRA that ComfyUI would load only in part (unknown layers) or not at all (wrong widths)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    unmatched = sorted({key.split(".", 1)[0] for key in lora} - set(key_map))
    problem = None
    if unmatched:
        problem = f"{len(unmatched)} of its LoRA layers do not exist in this model (e.g. {unmatched[0]!r})"
    else:
        weights = model.model.state_dict()
        for key, adapter in comfy.lora.load_lora(lora, key_map, log_missing=False).items():
            up, down = adapter.weights[0], adapter.weights[1]
            if (up.shape[0], down.shape[1]) != tuple(weights[key].shape[:2]):
                problem = (
                    f"its LoRA for {key!r} has shape {(up.shape[0], down.shape[1])} but the layer has "
                    f"{tuple(weights[key].shape[:2])}"
                )
                break
    if problem:
        raise ValueError(
            f"Parrot bundle {name!r} does not fit this model: it was trained on {config.base_model!r} and {problem}. "
            "Load a checkpoint of the bundle's base architecture (Stable Diffusion 1.x for an SD 1.5 bundle)."
        )


def apply_lora(model, bundle: Bundle, strength: float, name: str):
    """``model`` with the bundle's UNet LoRA, exactly as ``LoraLoaderModelOnly`` applies its kohya file."""
    path = bundle.folder / KOHYA_WEIGHT_NAME
    if not path.is_file():
        raise ValueError(
            f"Parrot bundle {name!r} has no {KOHYA_WEIGHT_NAME} (the UNet LoRA in the kohya naming ComfyUI reads). "
            "Write the bundle again with parrot-pipeline's `save_parrot_weights` or training."
        )
    try:
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as error:  # any failure to read the file: say which file, then what the reader said
        raise ValueError(
            f"Parrot bundle {name!r}: {KOHYA_WEIGHT_NAME} could not be read as a safetensors file ({error}). "
            "Copy the bundle again from its source, or write it again with parrot-pipeline."
        ) from error
    check_lora_fits(model, lora, bundle.config, name)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    return patched


class ExpanderModule(torch.nn.Module):
    """The expander LM as ComfyUI's ``ModelPatcher`` needs it: the patcher writes a ``device`` attribute, which
    transformers models only expose read-only."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm


@dataclasses.dataclass
class ParrotExpander:
    """The ``PARROT_EXPANDER`` value: the bundle's config and its expander LM (with adapter) under ComfyUI's model
    management, or no LM for a bundle trained without prompt expansion."""

    name: str
    config: ParrotConfig
    patcher: comfy.model_patcher.ModelPatcher | None
    tokenizer: PreTrainedTokenizerBase | None

    @classmethod
    def from_bundle(cls, bundle: Bundle, name: str) -> ParrotExpander:
        if not bundle.has_expander:
            return cls(name, bundle.config, None, None)
        load_device = comfy.model_management.text_encoder_device()
        dtype = torch.float16 if comfy.model_management.should_use_fp16(load_device) else torch.float32
        lm, tokenizer = bundle.load_expander(torch_dtype=dtype)
        patcher = comfy.model_patcher.ModelPatcher(
            ExpanderModule(lm),
            load_device=load_device,
            offload_device=comfy.model_management.text_encoder_offload_device(),
        )
        return cls(name, bundle.config, patcher, tokenizer)

    def expand(self, prompt: str, seed: int, max_new_tokens: int, identifiers: list[str]) -> str:
        """The expanded branch's text ``ĉ``: the identifiers, then the LM's expansion of ``prompt``."""
        if self.patcher is None:
            if not identifiers:
                raise ValueError(
                    f"Parrot bundle {self.name!r} has no expander and no reward identifiers are selected, so there "
                    "is nothing to expand with: select identifiers in `rewards`, or use the original prompt alone "
                    "(CLIPTextEncode → CFGGuider)."
                )
            return compose_expanded_prompt(identifiers, "")
        # Loaded whole onto the compute device (ComfyUI's partial loading is for its own layer types) and left to
        # ComfyUI's memory management, which offloads it like a text encoder when memory is needed.
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        config = dataclasses.replace(self.config.expander, max_new_tokens=max_new_tokens)
        expansion = expand_prompts(self.patcher.model.lm, self.tokenizer, [prompt], config, seed=seed)[0]
        return compose_expanded_prompt(identifiers, expansion)


def load_bundle(model, folder: Path, strength: float, name: str):
    """(MODEL with the bundle's LoRA, PARROT_EXPANDER) for the bundle in ``folder``. The LoRA goes on a clone of
    ``model``, so a failure leaves the input model as it was."""
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(
            f"{name!r} is not a Parrot bundle: the folder has no {CONFIG_NAME}. Put the whole bundle folder "
            f"({CONFIG_NAME}, the LoRA files and expander/) in models/parrot/; a plain LoRA file loads with "
            "LoraLoaderModelOnly."
        )
    bundle = read_bundle(folder)
    return apply_lora(model, bundle, strength, name), ParrotExpander.from_bundle(bundle, name)
