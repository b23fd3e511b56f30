"""Bad input gets a clear error naming the parameter, and never changes the pipeline."""

import shutil

import numpy as np
import pytest
import torch

from parrot_pipeline.bundle import CONFIG_NAME

from ..helpers import STEPS, load, seeded


@pytest.fixture
def pipe(tiny_sd):
    return load(tiny_sd)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"height": 60}, ValueError, "`height` and `width`"),
        ({"width": 100}, ValueError, "`height` and `width`"),
        ({"guidance_scale": -1.0}, ValueError, "`guidance_scale` must be a finite number ≥ 0"),
        ({"guidance_scale": float("inf")}, ValueError, "`guidance_scale`"),
        ({"expansion_guidance_scale": float("nan")}, ValueError, "`expansion_guidance_scale`"),
        ({"expansion_guidance_scale": -0.5}, ValueError, "`expansion_guidance_scale`"),
        ({"negative_prompt": ["a", "b", "c"]}, ValueError, "`negative_prompt` has 3 entries but `prompt` has 2"),
        ({"expanded_prompt": ["only one"]}, ValueError, "`expanded_prompt` has 1 entries but `prompt` has 2"),
        ({"reward_identifiers": [0]}, ValueError, "needs a loaded Parrot bundle"),
        ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt`"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        pipe(["a cat", "a dog"], num_inference_steps=1, **kwargs)


def test_bad_prompt_type(pipe):
    with pytest.raises(TypeError, match="`prompt`"):
        pipe(["a cat", 3], num_inference_steps=1)


@pytest.mark.parametrize(
    ("identifiers", "message"),
    [([3], r"Unknown entry 3 .* indices 0\.\.2"), (["beauty"], "Unknown entry 'beauty'"), ([True], "Unknown entry")],
)
def test_unknown_reward_identifier(pipe, bundle_dir, identifiers, message):
    pipe.load_parrot_weights(bundle_dir)
    with pytest.raises(ValueError, match=message):
        pipe("a cat", reward_identifiers=identifiers, num_inference_steps=1)


def test_identifier_subset_by_name_and_index(pipe, bundle_dir):
    pipe.load_parrot_weights(bundle_dir)
    out = pipe("a cat", expanded_prompt="x", reward_identifiers=["sentiment", 0], num_inference_steps=1, output_type="latent")
    assert out.expanded_prompts == ["<reward 3>, <reward 1>, x"]


def snapshot(pipe):
    return (
        {name: p.detach().clone() for name, p in pipe.unet.named_parameters()},
        pipe.expander,
        pipe.parrot_config,
        pipe("a cat", num_inference_steps=STEPS, generator=seeded(), output_type="np").images,
    )


def assert_unchanged(pipe, before):
    weights, expander, config, images = before
    assert {name: p for name, p in pipe.unet.named_parameters()}.keys() == weights.keys()
    assert pipe.expander is expander and pipe.parrot_config is config
    np.testing.assert_array_equal(pipe("a cat", num_inference_steps=STEPS, generator=seeded(), output_type="np").images, images)


def test_bundle_for_another_architecture_names_its_base_model(tiny_sd_wide, bundle_dir):
    pipe = load(tiny_sd_wide)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="made for base model .*tiny-sd0.* width 48 but the LoRA expects 32"):
        pipe.load_parrot_weights(bundle_dir)
    assert_unchanged(pipe, before)


def test_bad_bundle_after_a_good_one_keeps_the_good_one(pipe, bundle_dir, tmp_path):
    pipe.load_parrot_weights(bundle_dir)
    before = snapshot(pipe)
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "expander" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not load the expander from expander/"):
        pipe.load_parrot_weights(broken)
    assert_unchanged(pipe, before)


def test_folder_without_config_is_refused(pipe, bundle_dir, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(bundle_dir, folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=f"is not a Parrot bundle: it has no {CONFIG_NAME}"):
        pipe.load_parrot_weights(folder)
    assert not getattr(pipe.unet, "peft_config", None)


@pytest.mark.parametrize("name", ["pytorch_lora_weights.bin", "expander/adapter_model.bin", "extra.ckpt"])
def test_pickle_files_are_refused_and_never_opened(pipe, bundle_dir, tmp_path, monkeypatch, name):
    folder = tmp_path / "pickled"
    shutil.copytree(bundle_dir, folder)
    (folder / name).write_bytes(b"\x80\x04 a pickle that must never be loaded")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(ValueError, match="pickle format"):
        pipe.load_parrot_weights(folder)


def test_unreachable_hub_id_offline_names_the_id(offline_hub, pipe):
    with pytest.raises(OSError, match="'someone/parrot-bundle-that-is-not-cached'"):
        pipe.load_parrot_weights("someone/parrot-bundle-that-is-not-cached")
    with pytest.raises(OSError, match="'someone/an-expander'"):
        pipe.load_expander("someone/an-expander")


def test_missing_local_path_is_explained(pipe):
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid Hub repo id"):
        pipe.load_parrot_weights("./no/such/bundle/folder")


def test_save_without_adapter_explains(pipe, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        pipe.save_parrot_weights(tmp_path / "b", reward_names=["a"])
    assert list(tmp_path.iterdir()) == []


def test_expander_template_must_hold_the_placeholder():
    from parrot_pipeline import ExpanderConfig

    with pytest.raises(ValueError, match=r"\{prompt\}"):
        ExpanderConfig(template="Expand this: ")


@pytest.mark.parametrize(
    ("config", "message"),
    [({"encoder_hid_dim_type": "ip_image_proj"}, "IP-Adapter"), ({"time_cond_proj_dim": 256}, "time_cond_proj_dim")],
)
def test_unsupported_unet_additions_are_refused(pipe, config, message):
    pipe.unet.register_to_config(**config)
    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=1)
