"""PickScore on a tiny transformers CLIP, model and processor saved with ``save_pretrained`` in separate folders (the
real PickScore takes its processor from LAION's CLIP repo)."""

import pytest
import torch
import torchvision.transforms as T
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import CLIPModel, CLIPProcessor

from train.rewards import resolve_reward
from train.rewards.clip import to_pil

from .reward_models import tiny_transformers_clip

PROMPTS = ["a red fox in the snow", "a castle on a hill at sunset", "a cat"]


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    model, processor = tiny_transformers_clip(seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # exp(3) ≈ 20, a scale far from 1 so that a missing factor shows
    model_dir, processor_dir = tmp_path_factory.mktemp("pickscore"), tmp_path_factory.mktemp("clip-processor")
    model.save_pretrained(model_dir)
    processor.save_pretrained(processor_dir)
    return model_dir, processor_dir


def test_pickscore_is_logit_scale_times_cosine_with_the_original_prompt(pickscore_dirs):
    model_dir, processor_dir = pickscore_dirs
    reward = resolve_reward("pickscore", {"model": str(model_dir), "processor": str(processor_dir)})
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    scores = reward(images, ["expanded text, not scored"] * 3, {"original_prompts": PROMPTS})

    model, processor = CLIPModel.from_pretrained(model_dir), CLIPProcessor.from_pretrained(processor_dir, backend="pil")
    with torch.no_grad():
        image_embeds = model.get_image_features(**processor(images=to_pil(images), return_tensors="pt")).pooler_output
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_embeds = model.get_text_features(**text_inputs).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds)
    torch.testing.assert_close(scores, torch.exp(torch.tensor(3.0)) * cosine, rtol=1e-5, atol=1e-4)


def test_preprocessing_is_clips_resize_crop_normalise_on_pil(pickscore_dirs):
    model_dir, processor_dir = pickscore_dirs
    reward = resolve_reward("pickscore", {"model": str(model_dir), "processor": str(processor_dir)})
    reward.clip.load()
    clip_transform = T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
        T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    ])  # fmt: skip
    images = to_pil(torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(5)))
    pixels = reward.clip.processor(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, torch.stack([clip_transform(image) for image in images]), rtol=0, atol=1e-5)


def test_a_missing_model_offline_names_the_id_and_the_local_folder_way(offline_hub, pickscore_dirs):
    reward = resolve_reward("pickscore", {"processor": str(pickscore_dirs[1])})
    message = r"(?s)'yuvalkirstain/PickScore_v1'.*hf download yuvalkirstain/PickScore_v1 .*model: DIR"
    with pytest.raises(OSError, match=message):
        reward(torch.rand(1, 3, 32, 32), ["a cat"], {})
    reward = resolve_reward("pickscore", {"model": str(pickscore_dirs[0])})
    with pytest.raises(OSError, match=r"(?s)'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'.*processor: DIR"):
        reward(torch.rand(1, 3, 32, 32), ["a cat"], {})


def test_the_model_runs_in_the_chosen_precision_and_scores_come_back_in_float32(pickscore_dirs):
    options = {"model": str(pickscore_dirs[0]), "processor": str(pickscore_dirs[1]), "device": "cpu"}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    full = resolve_reward("pickscore", options)(images, PROMPTS[:2], {})
    half = resolve_reward("pickscore", {**options, "precision": "bf16"})
    scores = half(images, PROMPTS[:2], {})
    assert half.clip.model.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, full, rtol=0, atol=0.3)  # a 20-wide scale times bf16's ~1 % rounding
