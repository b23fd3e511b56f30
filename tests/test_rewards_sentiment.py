"""Zero-shot CLIP sentiment on a tiny open_clip saved in the Hub layout."""

import open_clip
import pytest
import torch

from train.config import load_config
from train.rewards import resolve_reward
from train.rewards.clip import to_pil
from train.rewards.sentiment import NEGATIVE, POSITIVE, TEMPLATES

from .reward_models import save_tiny_open_clip

IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"), seed=2)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(image) for image in to_pil(IMAGES)]))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")

    def text_features(texts):
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)

    return folder, torch.nn.functional.normalize(image_features, dim=-1), text_features, model.logit_scale.exp().item()


def test_sentiment_is_the_positive_mass_of_the_ensembled_zero_shot_classifier(tiny):
    folder, image_features, text_features, scale = tiny
    scores = resolve_reward("sentiment", {"model": f"local-dir:{folder}"})(IMAGES, ["a cat"] * 3, {})

    emotions = [*POSITIVE, *NEGATIVE]
    classes = torch.stack([text_features([t.format(e) for t in TEMPLATES]).mean(dim=0) for e in emotions])
    probabilities = (scale * image_features @ torch.nn.functional.normalize(classes, dim=-1).T).softmax(dim=-1)
    torch.testing.assert_close(scores, probabilities[:, : len(POSITIVE)].sum(dim=-1), rtol=1e-5, atol=1e-6)
    assert ((scores > 0) & (scores < 1)).all()


def test_two_emotions_and_one_template_give_the_logistic_of_the_scaled_cosine_gap(tiny):
    folder, image_features, text_features, scale = tiny
    options = {"model": f"local-dir:{folder}", "positive": ["joy"], "negative": ["gloom"], "templates": ["{} art"]}
    scores = resolve_reward("sentiment", options)(IMAGES, ["a cat"] * 3, {})
    joy, gloom = text_features(["joy art", "gloom art"])
    torch.testing.assert_close(scores, torch.sigmoid(scale * image_features @ (joy - gloom)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ("{templates: ['a photo of joy']}", "must each hold one '\\{\\}'"),
        ("{positive: []}", "`positive` is \\[\\]; give a non-empty list of strings"),
        ("{negative: sadness}", "`negative` is 'sadness'; give a non-empty list of strings"),
        ("{precision: fp64}", "`precision` is 'fp64'; allowed: \\['bf16', 'fp16', 'fp32'\\]"),
    ],
)
def test_bad_options_are_refused_with_the_config(options, message):
    with pytest.raises(ValueError, match=message):
        load_config(
            "configs/quickstart.yaml", ["rewards=[sentiment, colorfulness]", f"reward_options={{sentiment: {options}}}"]
        )
