"""Original-prompt-centred guidance as a ComfyUI guider for ``SamplerCustomAdvanced``. Imported when the Parrot
Guider node first runs (it needs ComfyUI)."""

from __future__ import annotations

import comfy.samplers

from parrot_pipeline.guidance import parrot_guidance


class Guider_Parrot(comfy.samplers.CFGGuider):
    """``ε∅ + w1·(ε(c) − ε∅) + w2·(ε(ĉ) − ε∅)`` with the three branches in one ``calc_cond_batch`` call per step.

    ComfyUI's models return denoised predictions rather than noise; the combination has weights summing to one, so
    it is the same on either. Pre- and post-CFG hooks run as in ``PerpNegGuider``: the pre-CFG hooks see
    ``[original, negative, expanded]`` (cond and uncond first, as they expect), the post-CFG hooks the guided result
    with ``cond_scale = w1`` and the expanded branch as ``expanded_cond``/``expanded_cond_denoised``. A
    ``sampler_cfg_function`` replaces two-branch CFG as a whole, so like ``PerpNegGuider`` this guider does not use one.
    """

    def set_conds(self, original, expanded, negative):
        self.inner_set_conds({"positive": original, "expanded": expanded, "negative": negative})

    def set_cfg(self, w1: float, w2: float):
        self.cfg = w1
        self.w2 = w2

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        original = self.conds.get("positive")
        negative = self.conds.get("negative")
        expanded = self.conds.get("expanded")
        if self.w2 == 0 and not model_options.get("disable_cfg1_optimization", False):
            expanded = None  # w2 = 0 is plain CFG: skip the expanded branch
        conds = [original, negative, expanded]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn(
                {
                    "conds": conds,
                    "conds_out": out,
                    "cond_scale": self.cfg,
                    "timestep": timestep,
                    "input": x,
                    "sigma": timestep,
                    "model": self.inner_model,
                    "model_options": model_options,
                }
            )
        original_pred, negative_pred, expanded_pred = out
        guided = parrot_guidance(
            negative_pred, original_pred, expanded_pred if expanded is not None else None, self.cfg, self.w2
        )
        for fn in model_options.get("sampler_post_cfg_function", []):
            guided = fn(
                {
                    "denoised": guided,
                    "cond": original,
                    "uncond": negative,
                    "cond_scale": self.cfg,
                    "model": self.inner_model,
                    "uncond_denoised": negative_pred,
                    "cond_denoised": original_pred,
                    "sigma": timestep,
                    "model_options": model_options,
                    "input": x,
                    "expanded_cond": expanded,
                    "expanded_cond_denoised": expanded_pred,
                }
            )
        return guided
