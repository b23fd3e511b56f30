"""DINO subject fidelity on a tiny ViT and DINO's image processor, saved with ``save_pretrained``."""

import pytest
import torch
import torchvision.transforms as T
from transformers import ViTModel

from train.rewards import resolve_reward
from train.rewards.clip import to_pil

from .reward_models import IMAGENET_MEAN, IMAGENET_STD, save_pretrained_pair, tiny_dino

REFERENCES = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(9))
IMAGES = torch.cat([REFERENCES[1:2], torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(10))])


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_pretrained_pair(tmp_path_factory.mktemp("tiny-dino"), *tiny_dino(seed=6))


def dino_transform(image):
    """DINO's ViT preprocessing: bilinear resize to the square input size, ImageNet normalisation."""
    resize = T.Resize((32, 32), interpolation=T.InterpolationMode.BILINEAR)
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(resize(image)))


def test_dino_similarity_is_the_mean_cls_cosine_to_the_references(dino_dir):
    reward = resolve_reward("dino_similarity", {"model": str(dino_dir)})
    scores = reward(IMAGES, ["a dog"] * 3, {"reference_images": REFERENCES})

    model = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False)

    def cls(images):
        with torch.no_grad():
            return model(torch.stack([dino_transform(image) for image in to_pil(images)])).last_hidden_state[:, 0]

    cosine = torch.nn.functional.cosine_similarity(cls(IMAGES)[:, None], cls(REFERENCES)[None], dim=-1)
    torch.testing.assert_close(scores, cosine.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_an_image_compared_with_itself_scores_one_the_maximum(dino_dir):
    reward = resolve_reward("dino_similarity", {"model": str(dino_dir)})
    scores = reward(IMAGES, ["a dog"] * 3, {"reference_images": IMAGES[:1]})
    torch.testing.assert_close(scores[0], torch.tensor(1.0))
    assert (scores[1:] < 1 - 1e-4).all()


def test_preprocessing_is_dinos_own_processor(dino_dir):
    reward = resolve_reward("dino_similarity", {"model": str(dino_dir)})
    reward.load()
    images = to_pil(IMAGES)
    pixels = reward.processor(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, torch.stack([dino_transform(image) for image in images]), rtol=0, atol=1e-5)


def test_the_missing_default_model_offline_names_the_id_and_the_local_folder_way(offline_hub):
    reward = resolve_reward("dino_similarity", {})
    with pytest.raises(OSError, match=r"(?s)'facebook/dino-vits16'.*hf download facebook/dino-vits16.*model: DIR"):
        reward(IMAGES, ["a dog"] * 3, {"reference_images": REFERENCES})
