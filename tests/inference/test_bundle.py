"""The Parrot bundle: round trips, stock diffusers loading, the kohya copy, the custom-pipeline route, the Hub."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from parrot_pipeline import ParrotConfig, ParrotPipeline, read_bundle
from parrot_pipeline import bundle as bundle_module
from parrot_pipeline.bundle import (
    CONFIG_NAME,
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    diffusers_to_kohya,
    kohya_to_diffusers,
    unet_lora_state_dict,
)

from ..helpers import STEPS, add_expander_lora, add_unet_lora, load, seeded


def generate(pipe, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "generator": seeded(), "output_type": "np", **kwargs}
    return pipe(["a cat", "a dog by the sea"], **kwargs)


def test_bundle_layout_and_config(bundle_dir, tiny_sd, tiny_expander_dir):
    names = {p.name for p in bundle_dir.iterdir()}
    assert {CONFIG_NAME, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "expander", "pipeline.py", "README.md"} <= names
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"
    config = json.loads((bundle_dir / CONFIG_NAME).read_text())
    assert config["format_version"] == 1
    assert config["base_model"] == str(tiny_sd)
    assert config["reward_names"] == ["aesthetic", "clip_score", "sentiment"]
    assert config["reward_identifiers"] == ["<reward 1>", "<reward 2>", "<reward 3>"]
    assert config["expander"]["base_model"] == str(tiny_expander_dir)
    assert "{prompt}" in config["expander"]["template"]
    assert (bundle_dir / "expander" / "adapter_config.json").is_file(), "the expander is saved as a peft adapter"
    card = (bundle_dir / "README.md").read_text()
    for expected in ("library_name: diffusers", "text-to-image", "lora", "stable-diffusion", "parrot"):
        assert expected in card


def test_save_then_load_gives_identical_images_and_expansions(tiny_sd, tiny_expander_dir, tmp_path):
    pipe = load(tiny_sd)
    pipe.load_expander(tiny_expander_dir)
    add_unet_lora(pipe, seed=5)
    add_expander_lora(pipe, seed=6)
    before = generate(pipe)
    pipe.save_parrot_weights(tmp_path / "b", reward_names=["a", "b"], reward_identifiers=["<a>", "<b>"])

    fresh = load(tiny_sd)
    fresh.load_parrot_weights(tmp_path / "b")
    after = generate(fresh, reward_identifiers=[])
    assert after.expanded_prompts == before.expanded_prompts
    np.testing.assert_allclose(after.images, before.images, atol=1e-5)
    with_ids = generate(fresh)
    assert with_ids.expanded_prompts == [f"<a>, <b>, {text}" for text in before.expanded_prompts]


def test_stock_load_lora_weights_equals_load_parrot_weights_without_expansion(bundle_dir, tiny_sd):
    parrot = load(tiny_sd)
    parrot.load_parrot_weights(bundle_dir)
    ours = generate(parrot, expansion_guidance_scale=0.0, guidance_scale=7.5).images

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(bundle_dir)
    theirs = generate(stock, guidance_scale=7.5).images

    base = generate(load(tiny_sd), guidance_scale=7.5).images
    assert np.abs(ours - base).max() > 1e-3, "the LoRA has an effect"
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_every_lora_key_has_a_kohya_twin_with_the_right_alpha(bundle_dir):
    diffusers_sd = load_file(bundle_dir / LORA_WEIGHT_NAME)
    kohya_sd = load_file(bundle_dir / KOHYA_WEIGHT_NAME)
    for key, tensor in diffusers_sd.items():
        module = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        kohya_module = "lora_unet_" + module.replace(".", "_")
        twin = kohya_module + (".lora_down.weight" if ".lora_A." in key else ".lora_up.weight")
        assert torch.equal(kohya_sd[twin], tensor)
        assert kohya_sd[kohya_module + ".alpha"].item() == 8.0  # lora_alpha=8 of the fixture, rank 4
    assert len(kohya_sd) == len(diffusers_sd) * 3 // 2


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(bundle_dir, tiny_sd):
    via_diffusers_file = StableDiffusionPipeline.from_pretrained(tiny_sd)
    via_diffusers_file.load_lora_weights(bundle_dir, weight_name=LORA_WEIGHT_NAME)
    via_kohya_file = StableDiffusionPipeline.from_pretrained(tiny_sd)
    via_kohya_file.load_lora_weights(bundle_dir, weight_name=KOHYA_WEIGHT_NAME)
    for pipe in (via_diffusers_file, via_kohya_file):
        pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(via_kohya_file).images, generate(via_diffusers_file).images, atol=1e-5)


def test_kohya_round_trip_and_rslora_alpha(tiny_sd):
    pipe = load(tiny_sd)
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["to_q"]))
    state_dict, config = unet_lora_state_dict(pipe.unet, "default")
    kohya = diffusers_to_kohya(state_dict, config)
    alphas = [v.item() for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(a == pytest.approx(6 / 2 * 4) for a in alphas), "kohya alpha/rank equals peft's scaling"
    back, kohya_alphas = kohya_to_diffusers(kohya)
    assert all(alpha == pytest.approx(12.0) for alpha in kohya_alphas.values())
    assert {module + ".lora_A.weight" for module in kohya_alphas} == {k.removeprefix("unet.") for k in state_dict if "lora_A" in k}
    assert set(back) == set(state_dict)
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)


def test_custom_pipeline_route(bundle_dir, tiny_sd):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd, custom_pipeline=str(bundle_dir), trust_remote_code=True)
    assert type(pipe).__name__ == "ParrotPipeline"
    pipe.set_progress_bar_config(disable=True)
    pipe.load_parrot_weights(bundle_dir)
    reference = load(tiny_sd)
    reference.load_parrot_weights(bundle_dir)
    out = generate(pipe)
    assert out.expanded_prompts[0].startswith("<reward 1>, <reward 2>, <reward 3>")
    np.testing.assert_allclose(out.images, generate(reference).images, atol=1e-6)


def test_loading_a_second_bundle_replaces_the_first(bundle_dir, tiny_sd, tiny_expander_dir, tmp_path):
    other = load(tiny_sd)
    other.load_expander(tiny_expander_dir)
    add_unet_lora(other, seed=7)
    add_expander_lora(other, seed=8)
    other.save_parrot_weights(tmp_path / "other", reward_names=["x", "y"])

    pipe = load(tiny_sd)
    pipe.load_parrot_weights(bundle_dir)
    pipe.load_parrot_weights(tmp_path / "other")
    assert list(pipe.unet.peft_config) == ["parrot"] and pipe.parrot_config.reward_names == ["x", "y"]
    fresh = load(tiny_sd)
    fresh.load_parrot_weights(tmp_path / "other")
    second, only = generate(pipe), generate(fresh)
    assert second.expanded_prompts == only.expanded_prompts
    np.testing.assert_array_equal(second.images, only.images)
    first = load(tiny_sd)
    first.load_parrot_weights(bundle_dir)
    assert np.abs(second.images - generate(first).images).max() > 1e-3, "nothing of the first bundle is left"


def test_save_refuses_existing_folder_without_overwrite(bundle_dir, tiny_sd, tmp_path):
    pipe = load(tiny_sd)
    add_unet_lora(pipe)
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_parrot_weights(target, reward_names=["a"])
    assert (target / "keep.txt").read_text() == "user data"
    pipe.save_parrot_weights(target, reward_names=["a"], overwrite=True)
    assert read_bundle(target).config.reward_names == ["a"] and not (target / "keep.txt").exists()


def test_save_refuses_non_finite_lora_and_leaves_nothing(tiny_sd, tmp_path):
    pipe = load(tiny_sd)
    add_unet_lora(pipe)
    with torch.no_grad():
        next(p for n, p in pipe.unet.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        pipe.save_parrot_weights(tmp_path / "nan", reward_names=["a"])
    assert list(tmp_path.iterdir()) == []


def test_push_bundle_to_hub_uploads_through_the_real_client_and_retries_server_errors(bundle_dir, tmp_path, monkeypatch):
    """huggingface_hub's own client talks HTTP to a stand-in of the Hub API on loopback (tests/hub_standin.py)."""
    import shutil

    import huggingface_hub.constants

    from ..hub_standin import HubStandIn

    folder = tmp_path / "to-push"
    shutil.copytree(bundle_dir, folder)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with HubStandIn() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        hub.failures["/api/models/me/parrot/commit/main"] = [503]  # the first commit fails: the upload is retried
        url = bundle_module.push_bundle_to_hub(folder, "me/parrot", private=True, token="hf_secret", retry_wait=0.01)
    assert url.startswith(f"{hub.endpoint}/me/parrot/commit/")
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before, "the pushed folder (maybe a Hub cache snapshot) is only read"
    repo = hub.repos["me/parrot"]
    assert repo["private"] is True
    assert set(repo["files"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert repo["files"]["pytorch_lora_weights.safetensors"] == (folder / "pytorch_lora_weights.safetensors").read_bytes()
    card = repo["files"]["README.md"].decode()
    assert 'load_parrot_weights("me/parrot")' in card and "hf_secret" not in card
    commits = [path for _, path, _ in hub.requests if path == "/api/models/me/parrot/commit/main"]
    assert len(commits) == 2, "one failed commit, one retried"
    api_calls = [headers for _, path, headers in hub.requests if "/me/parrot/" in path or path == "/api/repos/create"]
    assert all(headers["authorization"] == "Bearer hf_secret" for headers in api_calls)


@pytest.fixture
def hub_download(monkeypatch, tmp_path):
    """The Hub stand-in for downloads, with an empty cache of its own."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    from ..hub_standin import HubStandIn

    with HubStandIn() as hub:
        template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        # huggingface_hub before 0.35 reads the template from its own import of it
        monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        hub.cache = tmp_path / "hub-cache"
        yield hub


def hosted(hub, repo_id: str, folder: Path, extra: dict[str, bytes] = {}) -> None:  # noqa: B006
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub.repos[repo_id] = {"private": False, "files": {**files, **extra}}


def downloads(hub) -> set[str]:
    return {path.split("/resolve/")[1].split("/", 1)[1] for _, path, _ in hub.requests if "/resolve/" in path}


def test_a_hub_bundle_downloads_only_the_files_of_a_bundle(hub_download, bundle_dir):
    hosted(hub_download, "me/parrot", bundle_dir, {"samples/big.png": b"x" * 1000, "notes/training.log": b"log"})
    bundle = read_bundle("me/parrot", cache_dir=hub_download.cache)
    assert bundle.config.reward_names == read_bundle(bundle_dir).config.reward_names
    expected = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    expected = {name for name in expected if not name.startswith("samples/")}
    assert downloads(hub_download) == expected


def test_a_hub_bundle_with_a_pickle_is_refused_before_anything_downloads(hub_download, bundle_dir):
    hosted(hub_download, "me/pickled", bundle_dir, {"expander/adapter_model.bin": b"pickle"})
    with pytest.raises(ValueError, match=r"holds weight files in a pickle format \['expander/adapter_model.bin'\]"):
        read_bundle("me/pickled", cache_dir=hub_download.cache)
    assert downloads(hub_download) == set()


def test_push_bundle_to_hub_does_not_retry_a_refused_token(bundle_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub_standin import HubStandIn

    with HubStandIn() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        hub.failures["/api/repos/create"] = [401, 401, 401]
        with pytest.raises(HfHubHTTPError) as raised:
            bundle_module.push_bundle_to_hub(shutil.copytree(bundle_dir, tmp_path / "b"), "me/parrot", token="hf_secret",
                                             retry_wait=0.01)  # fmt: skip
    assert [path for _, path, _ in hub.requests].count("/api/repos/create") == 1, "a 401 is final"
    assert "hf_secret" not in str(raised.value)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="one entry per reward name"):
        ParrotConfig(base_model="x/y", reward_names=["a", "b"], reward_identifiers=["<reward 1>"])
    with pytest.raises(ValueError, match="guidance_scale"):
        ParrotConfig(base_model="x/y", reward_names=["a"], reward_identifiers=["<a>"], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="Unknown field"):
        ParrotConfig.from_dict({"base_model": "x/y", "reward_names": [], "reward_identifiers": [], "colour": 1})
    with pytest.raises(ValueError, match="format_version"):
        ParrotConfig(base_model="x/y", reward_names=[], reward_identifiers=[], format_version=99)


def test_parrot_pipeline_is_exported():
    assert issubclass(ParrotPipeline, DiffusionPipeline)


def test_bundle_default_scales_apply_when_the_call_gives_none(tiny_sd, tmp_path):
    pipe = load(tiny_sd)
    add_unet_lora(pipe)
    pipe.save_parrot_weights(tmp_path / "b", reward_names=["a"], guidance_scale=3.0, expansion_guidance_scale=2.0)
    fresh = load(tiny_sd)
    fresh.load_parrot_weights(tmp_path / "b")
    implicit = generate(fresh, expanded_prompt="x").images
    explicit = generate(fresh, expanded_prompt="x", guidance_scale=3.0, expansion_guidance_scale=2.0).images
    np.testing.assert_array_equal(implicit, explicit)
    assert np.abs(generate(fresh, expanded_prompt="x", guidance_scale=5.0).images - implicit).max() > 1e-4
