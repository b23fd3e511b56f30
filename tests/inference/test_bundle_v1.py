"""A bundle written before the expander's adapter moved from transformers' peft integration to peft's own API
(``tests/fixtures/bundle_v1``, see its script) loads as it did, and saving it again keeps its layout."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parrot_pipeline import read_bundle
from parrot_pipeline.expansion import load_expander

from ..helpers import STEPS, add_to_hub_cache, load, seeded

FIXTURE = Path(__file__).parents[1] / "fixtures" / "bundle_v1"
ADAPTER_FILE = "expander/adapter_model.safetensors"


@pytest.fixture
def hub_bases(offline_hub, tmp_path, monkeypatch, tiny_sd, tiny_expander_dir):
    """The fixture's base models under the Hub ids it names, in an offline Hugging Face cache."""
    cache = tmp_path / "hub-cache"
    add_to_hub_cache(cache, "parrot-tests/tiny-sd", tiny_sd)
    add_to_hub_cache(cache, "parrot-tests/tiny-expander", tiny_expander_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def hand_merged_expander(tiny_expander_dir):
    """The tiny expander with the fixture's LoRA added to its weights by hand: ``W += (α/r)·(B·A)ᵀ`` for GPT-2's
    Conv1D, which stores its weights as [in, out]."""
    model, _ = load_expander(tiny_expander_dir)
    lora = load_file(FIXTURE / ADAPTER_FILE)
    scaling = 4 / 2  # lora_alpha / r in the fixture's adapter_config.json
    with torch.no_grad():
        for key in [k for k in lora if k.endswith("lora_A.weight")]:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            delta = lora[key.replace("lora_A", "lora_B")] @ lora[key]
            model.get_submodule(module).weight += scaling * delta.T
    return model


def test_the_expander_adapter_attaches_every_weight_with_its_scaling(hub_bases, tiny_expander_dir):
    model, tokenizer = load_expander(FIXTURE / "expander")
    assert isinstance(model, PeftModel)
    assert model.active_peft_config.base_model_name_or_path == "parrot-tests/tiny-expander"
    parameters = dict(model.named_parameters())
    for key, tensor in load_file(FIXTURE / ADAPTER_FILE).items():
        assert torch.equal(parameters[key.replace(".weight", ".default.weight")], tensor), key

    inputs = tokenizer(["Input: a cat. Output:"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = hand_merged_expander(tiny_expander_dir)(**inputs).logits
        base = load_expander(tiny_expander_dir)[0](**inputs).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3), "the adapter changes the expander"


def hand_merged_unet_pipeline(tiny_sd) -> StableDiffusionPipeline:
    """Stock Stable Diffusion with the fixture's UNet LoRA added to its weights by hand: ``W += (α/r)·B·A``."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    lora = load_file(FIXTURE / "pytorch_lora_weights.safetensors")
    scaling = 4 / 2  # lora_alpha / r of the fixture's UNet adapter
    with torch.no_grad():
        for key in [k for k in lora if k.endswith("lora_A.weight")]:
            module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            pipe.unet.get_submodule(module).weight += scaling * lora[key.replace("lora_A", "lora_B")] @ lora[key]
    return pipe


def test_the_bundle_loads_in_the_pipeline_with_its_lora_scaled_as_trained(hub_bases, tiny_sd):
    pipe = load(tiny_sd)
    pipe.load_parrot_weights(FIXTURE)
    assert pipe.parrot_config.reward_names == ["jpeg_compressibility", "colorfulness"]
    assert isinstance(pipe.expander, PeftModel)
    out = pipe("a cat", num_inference_steps=STEPS, generator=seeded(), output_type="np")
    assert out.expanded_prompts[0].startswith("<reward 1>, <reward 2>, ")

    kwargs = {"num_inference_steps": STEPS, "output_type": "np", "guidance_scale": 5.0}
    plain = pipe("a cat", generator=seeded(), expansion_guidance_scale=0.0, **kwargs).images
    np.testing.assert_allclose(plain, hand_merged_unet_pipeline(tiny_sd)("a cat", generator=seeded(), **kwargs).images,
                               atol=1e-4)  # fmt: skip
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base.set_progress_bar_config(disable=True)
    assert np.abs(plain - base("a cat", generator=seeded(), **kwargs).images).max() > 1e-2, "the LoRA acts"


def with_lora_metadata(tmp_path, **fields) -> Path:
    """A copy of the fixture whose LoRA file records extra LoraConfig fields, as a newer peft would write."""
    folder = tmp_path / "bundle"
    shutil.copytree(FIXTURE, folder)
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    recorded = json.loads(metadata["lora_adapter_metadata"])
    recorded.update({f"unet.{name}": value for name, value in fields.items()})
    save_file(load_file(path), path, metadata={**metadata, "lora_adapter_metadata": json.dumps(recorded)})
    return folder


def test_lora_fields_the_installed_peft_lacks_are_dropped_when_unset_and_refused_when_set(hub_bases, tiny_sd, tmp_path):
    unset = with_lora_metadata(tmp_path / "unset", a_future_option=None, a_future_switch=False)
    assert "unet.a_future_option" not in read_bundle(unset).lora_metadata
    load(tiny_sd).load_parrot_weights(unset)

    pipe = load(tiny_sd)
    set_ = with_lora_metadata(tmp_path / "set", a_future_switch=True)
    with pytest.raises(ValueError, match=r"its LoRA uses a_future_switch=True, which peft .* upgrade peft"):
        pipe.load_parrot_weights(set_)
    assert not getattr(pipe.unet, "peft_config", None), "a refused bundle leaves the pipeline as it was"


def test_saving_the_loaded_bundle_again_writes_the_same_adapter_layout(hub_bases, tiny_sd, tmp_path):
    pipe = load(tiny_sd)
    pipe.load_parrot_weights(FIXTURE)
    pipe.save_parrot_weights(tmp_path / "again", reward_names=pipe.parrot_config.reward_names)
    expander_files = {p.name for p in (tmp_path / "again" / "expander").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= expander_files
    written, original = load_file(tmp_path / "again" / ADAPTER_FILE), load_file(FIXTURE / ADAPTER_FILE)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)
