"""HPS v2.1 on a tiny open_clip architecture, registered as a built-in config like ``ViT-H-14``, whose weights come
from a ``{"state_dict": …}`` checkpoint like ``HPS_v2.1_compressed.pt``."""

import open_clip
import pytest
import torch
import torchvision.transforms.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.transforms import InterpolationMode

from train.rewards import resolve_reward
from train.rewards.clip import to_pil

from .reward_models import add_tiny_open_clip_architecture, tiny_open_clip

PROMPTS = ["a red fox in the snow", "a castle on a hill at sunset"]


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """The architecture's name and the checkpoint, with the model it holds."""
    folder = tmp_path_factory.mktemp("hps")
    architecture = add_tiny_open_clip_architecture(folder, "tiny-hps-arch")
    fine_tuned = tiny_open_clip(seed=5)
    torch.save({"state_dict": fine_tuned.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return architecture, folder / "HPS_v2.1_compressed.pt", fine_tuned.eval()


def hps_preprocess(image, size=32):
    """HPS's own validation transform: longest side to ``size`` (bicubic), black padding centred, CLIP normalisation."""
    width, height = image.size
    scale = size / max(width, height)
    new_height, new_width = round(height * scale), round(width * scale)
    image = F.resize(image, [new_height, new_width], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new_height, size - new_width
    image = F.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return F.normalize(F.to_tensor(image), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def test_hpsv2_is_the_cosine_under_the_checkpoint_weights(hps):
    architecture, checkpoint, fine_tuned = hps
    reward = resolve_reward("hpsv2", {"model": architecture, "checkpoint": str(checkpoint)})
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    scores = reward(images, ["expanded text, not scored"] * 2, {"original_prompts": PROMPTS})

    tokenizer = open_clip.get_tokenizer(architecture)
    with torch.no_grad():
        image_features = fine_tuned.encode_image(torch.stack([hps_preprocess(image) for image in to_pil(images)]))
        text_features = fine_tuned.encode_text(tokenizer(PROMPTS))
    expected = torch.nn.functional.cosine_similarity(image_features, text_features)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_preprocessing_resizes_the_longest_side_and_pads_like_hps(hps):
    architecture, checkpoint, _ = hps
    reward = resolve_reward("hpsv2", {"model": architecture, "checkpoint": str(checkpoint)})
    reward.clip.load()
    for height, width in ((24, 64), (64, 40), (33, 33)):
        image = to_pil(torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height)))[0]
        torch.testing.assert_close(reward.clip.preprocess(image), hps_preprocess(image), rtol=0, atol=1e-6)
    padded = reward.clip.preprocess(to_pil(torch.ones(1, 3, 16, 64))[0])  # 32 × 8 when resized: 12 black rows a side
    black = (0 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    torch.testing.assert_close(padded[:, :12].mean(dim=(1, 2)), black)
    torch.testing.assert_close(padded[:, -12:].mean(dim=(1, 2)), black)


def test_a_checkpoint_that_does_not_fit_names_it_and_the_architecture(hps, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, path)
    reward = resolve_reward("hpsv2", {"model": hps[0], "checkpoint": str(path)})
    with pytest.raises(ValueError, match=f"checkpoint '{path}' into the open_clip architecture 'tiny-hps-arch'"):
        reward(torch.rand(1, 3, 32, 32), ["a cat"], {})
    with pytest.raises(ValueError, match="`checkpoint` needs `model` to be a built-in open_clip architecture"):
        resolve_reward("hpsv2", {"model": "local-dir:/some/folder", "checkpoint": str(path)})


def test_the_missing_default_checkpoint_offline_names_it_and_the_local_file_way(offline_hub, hps):
    reward = resolve_reward("hpsv2", {"model": hps[0]})
    message = r"(?s)'hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt'.*hf download xswu/HPSv2 HPS_v2.1_compressed.pt"
    with pytest.raises(OSError, match=message) as error:
        reward(torch.rand(1, 3, 32, 32), ["a cat"], {})
    assert "reward_options: {<reward>: {checkpoint: /path/to/HPS_v2.1_compressed.pt}}" in str(error.value)
