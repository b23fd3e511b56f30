"""The tiny offline components are deterministic, Stable-Diffusion-shaped and load through from_pretrained."""

import torch
from diffusers import UNet2DConditionModel

from parrot_pipeline import ParrotPipeline
from parrot_pipeline.tiny import default_tiny_model, tiny_pipeline_components


def test_components_are_deterministic_and_sd_shaped():
    first, second = tiny_pipeline_components(seed=0), tiny_pipeline_components(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        for (key, a), (_, b) in zip(first[name].state_dict().items(), second[name].state_dict().items()):
            assert torch.equal(a, b), f"{name}.{key} differs between two builds with the same seed"
    unet = first["unet"]
    assert 1.0e6 < sum(p.numel() for p in unet.parameters()) < 2.0e6
    assert unet.config.cross_attention_dim == first["text_encoder"].config.hidden_size
    assert 2 ** (len(first["vae"].config.block_out_channels) - 1) == 8, "SD's 8× latent downsampling"


def test_default_model_is_built_once_and_loads_with_its_expander(tmp_path, monkeypatch):
    monkeypatch.setenv("PARROT_PIPELINE_CACHE", str(tmp_path))
    path = default_tiny_model()
    assert path.parent == tmp_path and default_tiny_model() == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary build folder left behind"
    pipe = ParrotPipeline.from_pretrained(path)
    assert pipe.expander is not None and pipe.expander_tokenizer is not None
    assert isinstance(UNet2DConditionModel.from_pretrained(path, subfolder="unet"), UNet2DConditionModel)
