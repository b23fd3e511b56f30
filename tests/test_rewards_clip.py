"""The CLIP alignment reward on a tiny open_clip model saved in the Hub layout and loaded by the real path."""

import json

import open_clip
import pytest
import torch
from PIL import Image

from train.config import load_config
from train.rewards import resolve_reward
from train.rewards.clip import to_pil

from .reward_models import save_tiny_open_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"))


def test_clip_score_is_the_cosine_of_the_reference_embeddings(tiny_clip_dir):
    reward = resolve_reward("clip_score", {"model": f"local-dir:{tiny_clip_dir}"})
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog on a beach", "a castle"]
    scores = reward(images, ["expanded text that must not be used"] * 3, {"original_prompts": prompts})

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in to_pil(images)])
        image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(scores, (image_features * text_features).sum(-1), rtol=1e-5, atol=1e-5)

    scaled = resolve_reward("clip_score", {"model": f"local-dir:{tiny_clip_dir}", "scale_100": True})
    torch.testing.assert_close(scaled(images, prompts, {}), 100 * scores.clamp(min=0), rtol=1e-5, atol=1e-4)


def test_preprocessing_is_open_clips_own_transform_on_8_bit_images(tiny_clip_dir):
    reward = resolve_reward("clip_score", {"model": f"local-dir:{tiny_clip_dir}"})
    reward.clip.load()
    config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())
    assert list(reward.clip.preprocess.transforms[-1].mean) == config["preprocess_cfg"]["mean"]
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0] = 1.0
    assert to_pil(image)[0].getpixel((0, 0)) == (255, 0, 0)
    assert isinstance(to_pil(image)[0], Image.Image)


def test_missing_checkpoint_offline_names_the_id_and_the_local_folder_way(offline_hub):
    reward = resolve_reward("clip_score", {"model": "hf-hub:someone/clip-that-is-not-cached"})
    with pytest.raises(OSError, match="'hf-hub:someone/clip-that-is-not-cached'.*local-dir:"):
        reward(torch.rand(1, 3, 32, 32), ["a cat"], {})


def test_reward_options_are_checked_with_the_config():
    with pytest.raises(ValueError, match="Invalid `reward_options` for reward 'clip_score'"):
        load_config("configs/quickstart.yaml", ["rewards=[clip_score, colorfulness]", "reward_options={clip_score: {size: 3}}"])
    with pytest.raises(ValueError, match="options only for rewards in `rewards`"):
        load_config("configs/quickstart.yaml", ["reward_options={sharpness: {}}"])
