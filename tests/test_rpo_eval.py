"""DreamBench evaluation on tiny models: prompts by subject class, the runs' identifiers, images equal to the
pipelines', DINO / CLIP-I / CLIP-T against direct computations with the backbones, averages, resume, bad input."""

import csv
import re
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessorPil, ViTModel

from parrot_pipeline import ParrotConfig, save_bundle
from train.rpo_eval import main

from .helpers import add_unet_lora, load
from .reward_models import save_pretrained_pair, tiny_dino, tiny_transformers_clip

PROMPTS_AND_CLASSES = """Classes

subject_name,class
can,can
dog3,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def rpo_config(base_model: str, identifier: str, noun: str) -> ParrotConfig:
    return ParrotConfig(base_model=base_model, reward_names=["lambda_harmonic"], reward_identifiers=[],
                        expansion_guidance_scale=0.0, method="rpo",
                        extra={"identifier": identifier, "class_noun": noun})  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_sd):
    """A two-subject DreamBench (an object and a live subject), an RPO LoRA run for the can and a whole-UNet run for
    the dog, and tiny CLIP and DINO backbones."""
    root = tmp_path_factory.mktemp("dreambench")
    data = root / "dataset"
    data.mkdir()
    (data / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES)
    generator = torch.Generator().manual_seed(0)
    for name, suffix, size in (("can", "jpg", (48, 40)), ("dog3", "png", (40, 56))):
        (data / name).mkdir()
        for index in range(2):
            pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(data / name / f"{index:02d}.{suffix}")

    runs = root / "runs"
    pipe = load(tiny_sd)
    add_unet_lora(pipe, seed=5)
    save_bundle(runs / "can" / "bundle", unet=pipe.unet, config=rpo_config(str(tiny_sd), "zwx", "can"))
    model = shutil.copytree(tiny_sd, runs / "dog3" / "model")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}, weights)
    (model / "parrot_config.json").write_text(json.dumps(rpo_config(str(tiny_sd), "qqq", "dog").to_dict()))

    clip = save_pretrained_pair(root / "clip", *tiny_transformers_clip(seed=1))
    dino = save_pretrained_pair(root / "dino", *tiny_dino(seed=2))
    return {"data": data, "runs": runs, "clip": clip, "dino": dino, "model": tiny_sd, "root": root}


def arguments(bench, output, *extra):
    return ["--data", str(bench["data"]), "--runs", str(bench["runs"]), "--configs", "base,rpo", "--model",
            str(bench["model"]), "--images-per-prompt", "2", "--steps", "2", "--batch-size", "3", "--clip-model",
            str(bench["clip"]), "--dino-model", str(bench["dino"]), "--device", "cpu", "--output-dir", str(output),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(bench):
    output = bench["root"] / "out"
    assert main(arguments(bench, output)) == 0
    with open(output / "results.csv", newline="") as file:
        return output, list(csv.DictReader(file))


def test_images_are_the_pipelines_with_each_runs_identifier_and_the_class_prompts(bench, evaluated):
    output, _ = evaluated
    kwargs = {"num_inference_steps": 2, "guidance_scale": 7.5, "expansion_guidance_scale": 0.0}

    def image(pipe, prompt, seed):
        return np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0], dtype=int)

    def saved(path):
        return np.asarray(Image.open(output / "images" / path), dtype=int)

    base = load(bench["model"])
    assert np.abs(saved("base/can/000-seed1.png") - image(base, "a sks can in the jungle", 1)).max() <= 1
    assert np.abs(saved("base/dog3/001-seed0.png") - image(base, "a sks dog wearing a red hat", 0)).max() <= 1
    base.load_parrot_weights(bench["runs"] / "can" / "bundle")
    assert np.abs(saved("rpo/can/001-seed0.png") - image(base, "a red zwx can", 0)).max() <= 1
    whole = load(bench["runs"] / "dog3" / "model")
    assert np.abs(saved("rpo/dog3/000-seed1.png") - image(whole, "a qqq dog in the jungle", 1)).max() <= 1
    assert len(list((output / "images").rglob("*.png"))) == 2 * 2 * 2 * 2  # configs × subjects × prompts × seeds


def test_scores_equal_a_direct_computation_with_the_backbones(bench, evaluated):
    output, rows = evaluated
    clip, clip_processor = CLIPModel.from_pretrained(bench["clip"]), CLIPProcessor.from_pretrained(bench["clip"], backend="pil")
    dino, dino_processor = ViTModel.from_pretrained(bench["dino"]), ViTImageProcessorPil.from_pretrained(bench["dino"])
    normalize = torch.nn.functional.normalize

    def clip_images(images):
        pixels = clip_processor(images=images, return_tensors="pt").pixel_values
        return normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    def dino_images(images):
        pixels = dino_processor(images=images, return_tensors="pt").pixel_values
        return normalize(dino(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)

    texts = {"can": ["a can in the jungle", "a red can"], "dog3": ["a dog in the jungle", "a dog wearing a red hat"]}
    assert len(rows) == 4
    for row in rows:
        subject, configuration = row["subject"], row["configuration"]
        references = [Image.open(path).convert("RGB") for path in sorted((bench["data"] / subject).iterdir())]
        paths = sorted((output / "images" / configuration / subject).glob("*.png"))  # prompt-major, then seed
        images = [Image.open(path).convert("RGB") for path in paths]
        with torch.no_grad():
            generated_clip = clip_images(images)
            prompts = clip_processor(text=[t for t in texts[subject] for _ in range(2)], padding=True, return_tensors="pt")
            text = normalize(clip.get_text_features(**prompts).pooler_output, dim=-1)
            expected = {
                "dino": (dino_images(images) @ dino_images(references).T).mean().item(),
                "clip_i": (generated_clip @ clip_images(references).T).mean().item(),
                "clip_t": (generated_clip * text).sum(dim=-1).clamp(min=0).mean().item(),
            }  # fmt: skip
        for metric, value in expected.items():
            assert float(row[metric]) == pytest.approx(value, abs=1e-5), (subject, configuration, metric)
        assert row["live"] == str(subject == "dog3") and row["images"] == "4"
        assert row["identifier"] == {"base": "sks", "rpo": {"can": "zwx", "dog3": "qqq"}[subject]}[configuration]


def test_the_summary_averages_subjects_and_a_rerun_resumes_without_drawing(bench, evaluated, monkeypatch):
    output, rows = evaluated
    summary = (output / "summary.md").read_text()
    for configuration in ("base", "rpo"):
        mine = [row for row in rows if row["configuration"] == configuration]
        means = [f"{sum(float(r[m]) for r in mine) / 2:.3f}" for m in ("dino", "clip_i", "clip_t")]
        assert f"| {configuration} | {' | '.join(means)} |" in summary
    assert "| RPO paper, λ = 0.5 (SD 2.1) | 0.652 | 0.833 | 0.314 |" in summary
    assert "| rpo | dog3 | dog | live |" in summary and "| base | can | can | object |" in summary

    before = (output / "results.csv").read_text()
    monkeypatch.setattr("train.rpo_eval.load_pipeline", lambda *a, **k: pytest.fail("images drawn again"))
    assert main(arguments(bench, output)) == 0
    assert (output / "results.csv").read_text() == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: ["--subjects", "can,teapot"], r"--subjects: \['teapot'\] are not in the subject table"),
        (lambda b: ["--runs", str(b["root"] / "dataset")], r"--runs: .*dataset/can holds no RPO result"),
        (lambda b: ["--prompts-file", str(b["root"] / "missing.txt")], r"missing\.txt is missing"),
        (lambda b: ["--configs", "base,dreambooth"], r"unknown configuration 'dreambooth'"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(bench, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.setattr("train.rpo_eval.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exited:
        main(arguments(bench, tmp_path / "out", *change(bench)))
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_another_evaluation_in_the_output_folder_is_refused(bench, evaluated, capsys):
    output, _ = evaluated
    with pytest.raises(SystemExit):
        main(arguments(bench, output, "--images-per-prompt", "3"))
    assert "holds an evaluation with other settings (images_per_prompt differ)" in capsys.readouterr().err
