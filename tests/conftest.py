"""Shared fixtures: tiny models saved once per session and loaded through the real ``from_pretrained`` path."""

from __future__ import annotations

import huggingface_hub.constants
import huggingface_hub.utils
import pytest
import torch

from parrot_pipeline.tiny import save_tiny_expander, save_tiny_pipeline

from .helpers import add_expander_lora, add_unet_lora, load
from .hub_standin import HubStandIn

# The tiny models are too small to gain from intra-op threads; one thread is faster and does not slow down on a
# machine busy with other work.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The embedded default models are built in a per-session temporary folder, not the user's cache (before any
    module-scoped fixture runs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARROT_PIPELINE_CACHE", str(tmp_path_factory.getbasetemp() / "parrot-cache"))
        yield


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_vpred(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-vpred"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd_wide(tmp_path_factory):
    """Another architecture: cross-attention width 48 instead of 32."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-wide"), cross_attention_dim=48)


@pytest.fixture(scope="session")
def tiny_expander_dir(tmp_path_factory):
    return save_tiny_expander(tmp_path_factory.mktemp("tiny-expander"))


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, tiny_sd, tiny_expander_dir):
    """A bundle with a random UNet LoRA and a random expander LoRA, written by ``save_parrot_weights``."""
    pipe = load(tiny_sd)
    pipe.load_expander(tiny_expander_dir)
    add_unet_lora(pipe)
    add_expander_lora(pipe)
    target = tmp_path_factory.mktemp("bundles") / "bundle"
    pipe.save_parrot_weights(target, reward_names=["aesthetic", "clip_score", "sentiment"])
    return target


@pytest.fixture
def offline_hub():
    """The Hub client offline, as under HF_HUB_OFFLINE=1. huggingface_hub 0.x keeps one HTTP session per thread,
    made offline or online when first used, so the sessions are reset on both sides."""
    reset_sessions = getattr(huggingface_hub.utils, "reset_sessions", lambda: None)  # gone in huggingface_hub 1.0
    reset_sessions()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield
    reset_sessions()


@pytest.fixture
def hub(monkeypatch):
    """A Hub stand-in serving the real client's requests; uploads never wait between retries."""
    monkeypatch.setattr("parrot_pipeline.bundle.time.sleep", lambda seconds: None)
    with HubStandIn() as standin:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
        yield standin
