"""The Parrot nodes (ComfyUI's V1 node interface, which every ComfyUI release loads).

ComfyUI imports every node pack at start-up. This module imports neither ComfyUI nor torch-heavy libraries: the
modules that do (``.bundle``, ``.guider`` and ``parrot_pipeline``) are imported when a node first runs, so the pack
loads in milliseconds and its definitions can be checked without ComfyUI.
"""

from __future__ import annotations

from .paths import all_bundles, resolve_bundle

CATEGORY = "Parrot"
SCALE = {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}
# The inputs the Parrot Guider and the KSampler conditioning share: both prompts and both guidance scales.
GUIDANCE_INPUTS = {
    "original": ("CONDITIONING", {"tooltip": "The encoded original prompt c."}),
    "expanded": ("CONDITIONING", {"tooltip": "The encoded expanded prompt ĉ."}),
    "w1": ("FLOAT", {**SCALE, "tooltip": "Guidance scale on the original prompt."}),
    "w2": ("FLOAT", {**SCALE, "tooltip": "Guidance scale on the expanded prompt."}),
}


def parse_rewards(text: str) -> list[str] | None:
    """The ``rewards`` field: ``all`` (None: every identifier), ``none`` or empty ([]), or reward names separated
    by commas."""
    text = text.strip()
    if text.lower() == "all":
        return None
    if text.lower() in ("", "none"):
        return []
    names = [name.strip() for name in text.split(",")]
    if "" in names:
        raise ValueError(f"`rewards` {text!r} has an empty entry; write reward names separated by commas.")
    return names


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("`prompt` is empty: type the short prompt that the expander should expand.")
    return prompt.strip()


def check_scales(w1: float, w2: float) -> None:
    from parrot_pipeline.bundle import check_scale

    check_scale("w1", w1)
    check_scale("w2", w2)


class ParrotBundleLoader:
    DESCRIPTION = (
        "Loads a Parrot bundle: applies its UNet LoRA to the model with ComfyUI's LoRA loader and loads its prompt "
        "expander. Bundles are folders in models/parrot/ or models/loras/, or Hub bundles in the local Hugging Face "
        "cache (hf:owner/name)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "PARROT_EXPANDER")
    RETURN_NAMES = ("model", "expander")
    OUTPUT_TOOLTIPS = ("The model with the bundle's LoRA.", "The bundle's prompt expander and settings.")
    FUNCTION = "load_bundle"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A checkpoint of the architecture the bundle was trained on."}),
                "bundle": (
                    sorted(all_bundles()),
                    {"tooltip": "The bundle folder (parrot_config.json, LoRA, expander/)."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -100.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "LoRA strength on the UNet.",
                    },
                ),
            }
        }

    def load_bundle(self, model, bundle: str, strength: float):
        from .bundle import load_bundle

        return load_bundle(model, resolve_bundle(bundle, all_bundles()), strength, bundle)


class ParrotExpandPrompt:
    DESCRIPTION = (
        "Expands a short prompt with the bundle's language model and puts the chosen reward identifiers in front. "
        "Encode `expanded` and `original` with two CLIPTextEncodes for the Parrot Guider."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("expanded", "original")
    OUTPUT_TOOLTIPS = ("Reward identifiers, then the expansion (ĉ).", "The prompt as typed (c).")
    FUNCTION = "expand"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "expander": ("PARROT_EXPANDER",),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The short prompt to expand."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Seeds the expander's sampling: the same seed gives the same expansion.",
                    },
                ),
                "max_new_tokens": (
                    "INT",
                    {"default": 77, "min": 1, "max": 512, "tooltip": "Length limit of the expansion."},
                ),
                "rewards": (
                    "STRING",
                    {
                        "default": "all",
                        "tooltip": "Identifiers to prepend: all, none, or reward names separated by commas "
                        "(the bundle's reward_names).",
                    },
                ),
            }
        }

    def expand(self, expander, prompt: str, seed: int, max_new_tokens: int, rewards: str):
        prompt = check_prompt(prompt)
        identifiers = parse_rewards(rewards)
        if identifiers is None:
            identifiers = list(expander.config.reward_identifiers)
        else:
            identifiers = expander.config.select_identifiers(identifiers, field="rewards")
        return (expander.expand(prompt, seed, max_new_tokens, identifiers), prompt)


class ParrotGuider:
    DESCRIPTION = (
        "Original-prompt-centred guidance for SamplerCustomAdvanced: ε∅ + w1·(ε(c) − ε∅) + w2·(ε(ĉ) − ε∅), the "
        "three branches in one batched model call per step. w2 = 0 is plain CFG with cfg = w1."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        original, expanded, w1, w2 = GUIDANCE_INPUTS.values()
        return {
            "required": {
                "model": ("MODEL",),
                "original": original,
                "expanded": expanded,
                "negative": ("CONDITIONING", {"tooltip": "The encoded negative (or empty) prompt ∅."}),
                "w1": w1,
                "w2": w2,
            }
        }

    def get_guider(self, model, original, expanded, negative, w1: float, w2: float):
        check_scales(w1, w2)
        from .guider import Guider_Parrot

        guider = Guider_Parrot(model)
        guider.set_conds(original, expanded, negative)
        guider.set_cfg(w1, w2)
        return (guider,)


class ParrotKSamplerConditioning:
    DESCRIPTION = (
        "Parrot guidance for the plain KSampler: connect `positive` to its positive input and `cfg` to its cfg. "
        "KSampler averages the two prompts' predictions weighted by strength, (w1·ε(c) + w2·ε(ĉ)) / (w1 + w2), and "
        "CFG with cfg = w1 + w2 turns that into ε∅ + w1·(ε(c) − ε∅) + w2·(ε(ĉ) − ε∅), in one batched model call."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "FLOAT")
    RETURN_NAMES = ("positive", "cfg")
    OUTPUT_TOOLTIPS = ("Both prompts, weighted w1 and w2.", "w1 + w2: KSampler's cfg.")
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(GUIDANCE_INPUTS)}

    def combine(self, original, expanded, w1: float, w2: float):
        check_scales(w1, w2)
        positive = [
            [tensor, {**options, "strength": options.get("strength", 1.0) * weight}]
            for weight, conditioning in ((w1, original), (w2, expanded))
            for tensor, options in conditioning
        ]
        return (positive, w1 + w2)


NODE_CLASS_MAPPINGS = {
    "ParrotBundleLoader": ParrotBundleLoader,
    "ParrotExpandPrompt": ParrotExpandPrompt,
    "ParrotGuider": ParrotGuider,
    "ParrotKSamplerConditioning": ParrotKSamplerConditioning,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ParrotBundleLoader": "Parrot Bundle Loader",
    "ParrotExpandPrompt": "Parrot Expand Prompt",
    "ParrotGuider": "Parrot Guider",
    "ParrotKSamplerConditioning": "Parrot Conditioning (KSampler)",
}
