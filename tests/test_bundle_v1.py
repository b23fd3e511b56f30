"""A bundle written before the expander's adapter moved from transformers' peft integration to peft's own API
(``tests/fixtures/bundle_v1``, see its script) loads as it did, and saving it again keeps its layout."""

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import PeftModel
from safetensors.torch import load_file

from parrot_pipeline.expansion import load_expander

from .helpers import STEPS, add_to_hub_cache, load, seeded

FIXTURE = Path(__file__).parent / "fixtures" / "bundle_v1"
ADAPTER_FILE = "expander/adapter_model.safetensors"


@pytest.fixture
def hub_bases(tmp_path, monkeypatch, tiny_sd, tiny_expander_dir):
    """The fixture's base models under the Hub ids it names, in an offline Hugging Face cache."""
    cache = tmp_path / "hub-cache"
    add_to_hub_cache(cache, "parrot-tests/tiny-sd", tiny_sd)
    add_to_hub_cache(cache, "parrot-tests/tiny-expander", tiny_expander_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


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


def test_the_bundle_loads_in_the_pipeline_and_its_lora_in_stock_diffusers(hub_bases, tiny_sd):
    pipe = load(tiny_sd)
    pipe.load_parrot_weights(FIXTURE)
    assert pipe.parrot_config.reward_names == ["jpeg_compressibility", "colorfulness"]
    assert isinstance(pipe.expander, PeftModel)
    out = pipe("a cat", num_inference_steps=STEPS, generator=seeded(), output_type="np")
    assert out.expanded_prompts[0].startswith("<reward 1>, <reward 2>, ")

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(FIXTURE)
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", "guidance_scale": 5.0}
    np.testing.assert_array_equal(
        pipe("a cat", generator=seeded(), expansion_guidance_scale=0.0, **kwargs).images,
        stock("a cat", generator=seeded(), **kwargs).images,
    )


def test_saving_the_loaded_bundle_again_writes_the_same_adapter_layout(hub_bases, tiny_sd, tmp_path):
    pipe = load(tiny_sd)
    pipe.load_parrot_weights(FIXTURE)
    pipe.save_parrot_weights(tmp_path / "again", reward_names=pipe.parrot_config.reward_names)
    expander_files = {p.name for p in (tmp_path / "again" / "expander").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= expander_files
    written, original = load_file(tmp_path / "again" / ADAPTER_FILE), load_file(FIXTURE / ADAPTER_FILE)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)
