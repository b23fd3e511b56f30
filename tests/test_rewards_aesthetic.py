"""The LAION aesthetic reward on a tiny open_clip (Hub layout) and a random head in the real head's file formats."""

import os
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from train.config import load_config
from train.rewards import resolve_reward
from train.rewards.clip import to_pil

from .reward_models import aesthetic_head_state, save_tiny_open_clip

IMAGES = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"))


@pytest.fixture(scope="module")
def head_state():
    return aesthetic_head_state(embed_dim=16)


@pytest.fixture(scope="module", params=["pth", "safetensors"])
def head_file(request, tmp_path_factory, head_state):
    path = tmp_path_factory.mktemp("head") / f"sac+logos+ava1-l14-linearMSE.{request.param}"
    if request.param == "pth":
        torch.save(head_state, path)  # the legacy format of the published head
    else:
        save_file(head_state, path)
    return path


def test_aesthetic_is_the_linear_head_on_the_normalised_embedding(tiny_clip_dir, head_state, head_file):
    reward = resolve_reward("aesthetic", {"model": f"local-dir:{tiny_clip_dir}", "head": str(head_file)})
    scores = reward(IMAGES, ["unused"] * 3, {})

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    with torch.no_grad():
        embedding = model.encode_image(torch.stack([preprocess(image) for image in to_pil(IMAGES)]))
    hidden = embedding / embedding.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # dropout is inactive at inference and there are no activations
        hidden = hidden @ head_state[f"layers.{index}.weight"].T + head_state[f"layers.{index}.bias"]
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, hidden.squeeze(-1), rtol=1e-5, atol=1e-5)


def test_the_pth_head_is_read_without_running_pickled_code(tiny_clip_dir, head_state, tmp_path):
    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "code-ran"),)

    path = tmp_path / "head.pth"
    torch.save({**head_state, "extra": Payload()}, path)
    reward = resolve_reward("aesthetic", {"model": f"local-dir:{tiny_clip_dir}", "head": str(path)})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        reward(IMAGES, ["unused"] * 3, {})
    assert not (tmp_path / "code-ran").exists()


def test_a_head_in_another_layout_is_refused_with_the_expected_one(tiny_clip_dir, head_state, tmp_path):
    path = tmp_path / "head.safetensors"
    save_file({name.replace("layers.", "mlp."): value for name, value in head_state.items()}, path)
    reward = resolve_reward("aesthetic", {"model": f"local-dir:{tiny_clip_dir}", "head": str(path)})
    with pytest.raises(ValueError, match="not in the predictor's layout.*layers.0, 2, 4, 6, 7"):
        reward(IMAGES, ["unused"] * 3, {})


def test_a_missing_head_fails_with_the_id_and_the_local_file_way(offline_hub, tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="`head`: no file '/nowhere/head.pth'"):
        load_config("configs/quickstart.yaml", ["rewards=[aesthetic, colorfulness]",
                                                "reward_options={aesthetic: {head: /nowhere/head.pth}}"])  # fmt: skip
    with pytest.raises(ValueError, match="`head` is 'hf-hub:someone/repo'; a file on the Hub is 'hf-hub:owner/repo/fi"):
        resolve_reward("aesthetic", {"head": "hf-hub:someone/repo"})
    head = "hf-hub:someone/not-cached/head.pth"
    reward = resolve_reward("aesthetic", {"model": f"local-dir:{tiny_clip_dir}", "head": head})
    message = r"(?s)'hf-hub:someone/not-cached/head.pth'.*hf download someone/not-cached head.pth.*head: /path/to/"
    with pytest.raises(OSError, match=message):
        reward(IMAGES, ["unused"] * 3, {})


def test_the_backbone_runs_in_the_chosen_precision(tiny_clip_dir, head_file):
    options = {"model": f"local-dir:{tiny_clip_dir}", "head": str(head_file), "device": "cpu"}
    full = resolve_reward("aesthetic", options)(IMAGES, ["unused"] * 3, {})
    half = resolve_reward("aesthetic", {**options, "precision": "bf16"})
    scores = half(IMAGES, ["unused"] * 3, {})
    assert half.clip.model.visual.conv1.weight.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, full, rtol=0, atol=0.02)
