"""RPO's λ-harmonic reward with CLIP (a tiny open_clip in the Hub layout) and ALIGN (a tiny transformers ALIGN)."""

import pytest
import torch
import torchvision.transforms as T
from transformers import AlignModel, BertTokenizer

from train.config import load_config
from train.rewards import resolve_reward
from train.rewards.clip import to_pil
from train.rewards.tiny import tiny_align

from .reward_models import save_pretrained_pair, save_tiny_open_clip

PROMPTS = ["a photo of sks dog on a beach", "a sks dog in the snow", "a painting of sks dog"]
SUBJECT = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(7))  # two reference images
IMAGES = torch.cat([SUBJECT[:1], torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(8))])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"), seed=3)


@pytest.fixture(scope="module")
def align_dir(tmp_path_factory):
    return save_pretrained_pair(tmp_path_factory.mktemp("tiny-align"), *tiny_align(seed=4))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    for index, image in enumerate(to_pil(SUBJECT)):
        image.save(folder / f"{index:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def reward(model, lam, **options):
    return resolve_reward("lambda_harmonic", {"model": model, "lam": lam, "identifier": "sks", **options})


@pytest.mark.parametrize("backend", ["open_clip", "align"])
def test_lambda_mixes_subject_fidelity_and_text_alignment_harmonically(backend, clip_dir, align_dir):
    model = f"local-dir:{clip_dir}" if backend == "open_clip" else str(align_dir)
    metadata = {"original_prompts": PROMPTS, "reference_images": SUBJECT}
    half = reward(model, 0.5)
    encoder = half.encoder
    features = encoder.image_features(IMAGES)
    references = encoder.image_features(SUBJECT)
    subject = ((features @ references.T + 1) / 2).mean(dim=1)
    texts = ["a photo of dog on a beach", "a dog in the snow", "a painting of dog"]  # the identifier removed
    alignment = ((features * encoder.text_features(texts)).sum(dim=-1) + 1) / 2

    s_image, s_text = half.similarities(IMAGES, ["expanded, not scored"] * 3, metadata)
    torch.testing.assert_close(s_image, subject)
    torch.testing.assert_close(s_text, alignment)
    torch.testing.assert_close(reward(model, 1.0)(IMAGES, PROMPTS, metadata), subject)
    torch.testing.assert_close(reward(model, 0.0)(IMAGES, PROMPTS, metadata), alignment)
    torch.testing.assert_close(half(IMAGES, PROMPTS, metadata), 2 * subject * alignment / (subject + alignment))
    assert ((s_image >= 0) & (s_image <= 1) & (s_text >= 0) & (s_text <= 1)).all()


@pytest.mark.parametrize("backend", ["open_clip", "align"])
def test_an_image_compared_with_itself_has_maximal_similarity(backend, clip_dir, align_dir):
    model = f"local-dir:{clip_dir}" if backend == "open_clip" else str(align_dir)
    subject_only = reward(model, 1.0)
    scores = subject_only(IMAGES, PROMPTS, {"reference_images": IMAGES[:1]})
    torch.testing.assert_close(scores[0], torch.tensor(1.0))
    assert (scores[1:] < 1 - 1e-4).all()


def test_align_features_are_the_models_own_on_aligns_preprocessing(align_dir):
    encoder = reward(str(align_dir), 0.5).encoder
    resize = T.Resize((38, 38), interpolation=T.InterpolationMode.BILINEAR)
    to_pixels = T.Compose([resize, T.CenterCrop(32), T.ToTensor()])
    pixels = torch.stack([to_pixels(image) * 2 - 1 for image in to_pil(IMAGES)])
    model, tokenizer = AlignModel.from_pretrained(align_dir), BertTokenizer.from_pretrained(align_dir)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text_embeds = model.get_text_features(**tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(encoder.image_features(IMAGES), normalize(image_embeds, dim=-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder.text_features(PROMPTS), normalize(text_embeds, dim=-1), rtol=1e-4, atol=1e-5)


def test_a_references_folder_equals_the_same_images_passed_in_metadata(align_dir, reference_dir):
    from_folder = reward(str(align_dir), 0.5, references=str(reference_dir))(IMAGES, PROMPTS, {})
    from_metadata = reward(str(align_dir), 0.5)(IMAGES, PROMPTS, {"reference_images": list(SUBJECT)})
    torch.testing.assert_close(from_folder, from_metadata)


def test_without_reference_images_the_error_says_how_to_give_them(align_dir):
    with pytest.raises(ValueError, match=r"`references` to a folder of images, or pass metadata\['reference_images'\]"):
        reward(str(align_dir), 0.5)(IMAGES, PROMPTS, {})


@pytest.mark.parametrize(
    "options, error, message",
    [
        ("{lam: 1.5}", ValueError, "`lam` \\(λ\\) is 1.5; it must lie in \\[0, 1\\]"),
        ("{references: /nowhere}", FileNotFoundError, "`references`: '/nowhere' is not a folder holding images"),
    ],
)
def test_bad_options_are_refused_with_the_config(options, error, message):
    with pytest.raises(error, match=message):
        overrides = ["rewards=[lambda_harmonic, colorfulness]", f"reward_options={{lambda_harmonic: {options}}}"]
        load_config("configs/quickstart.yaml", overrides)


def test_the_missing_default_align_offline_names_the_id_and_the_local_folder_way(offline_hub):
    scorer = resolve_reward("lambda_harmonic", {})
    with pytest.raises(OSError, match=r"(?s)'kakaobrain/align-base'.*hf download kakaobrain/align-base.*model: DIR"):
        scorer(IMAGES, PROMPTS, {"reference_images": SUBJECT})


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a sks dog on a beach", "a dog on a beach"),
    ("a photo of sks, wearing a hat", "a photo of, wearing a hat"),
    ("sks's collar in the grass", "collar in the grass"),
    ("sks, a dog", "a dog"),
    ("a sks dog asks for food.", "a dog asks for food."),  # a word that contains it stays
])  # fmt: skip
def test_the_identifier_is_removed_with_its_punctuation_and_possessive(prompt, expected):
    from train.rewards.lambda_harmonic import remove_identifier

    assert remove_identifier(prompt, "sks") == expected
