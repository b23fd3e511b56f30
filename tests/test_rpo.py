"""RPO on the tiny model: the preference loss, the labels, learning the references, early stopping, the bundle in
diffusers, cached negatives, resume, the whole-UNet variant, the Hub, and bad input refused before any model loads."""

import json
import math
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from train.config import load_config
from train.parrot import lora_parameters
from train.rewards.references import read_subject_images
from train.rpo import RPOConfig, RPOTrainer, label_probabilities, main, rpo_loss

from .helpers import load, seeded, two_process_launch

SUBJECT = "train/data/rpo/quickstart_subject"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each trainer builds its own Accelerator (accelerate keeps one state per process otherwise)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def small_overrides(folder, cache) -> list[str]:
    """The quickstart preset shrunk to seconds: 2 prompts × 2 negatives, 32 px, 2 denoising steps."""
    prompts = folder / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("a {} on the moon\na blue {}\n")
    return [f"output_dir={folder / 'run'}", "overwrite=false", f"prompts={prompts}", "negatives_per_prompt=2",
            "resolution=32", "num_inference_steps=2", "validation_images_per_prompt=1", "max_steps=4",
            "validate_every=2", "train_batch_size=2", f"negatives_cache={cache}"]  # fmt: skip


def small_config(folder, *overrides, cache=None):
    return load_config("configs/rpo_quickstart.yaml",
                       [*small_overrides(folder, cache or folder / "negatives"), *overrides], RPOConfig)  # fmt: skip


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# The loss and the labels


def test_the_preference_loss_equals_a_hand_computation():
    model_ref, model_gen = torch.tensor([0.30, 0.10]), torch.tensor([0.20, 0.50])
    pretrained_ref, pretrained_gen = torch.tensor([0.35, 0.12]), torch.tensor([0.18, 0.40])
    labels = torch.tensor([1.0, 0.0])
    loss, parts = rpo_loss(model_ref, model_gen, pretrained_ref, pretrained_gen, labels)

    delta = [(0.35 - 0.30) - (0.18 - 0.20), (0.12 - 0.10) - (0.40 - 0.50)]  # 0.07, 0.12
    sigmoid = [1 / (1 + math.exp(-d)) for d in delta]
    bce = -(math.log(sigmoid[0]) + math.log(1 - sigmoid[1])) / 2  # label 1 for the first pair, 0 for the second
    assert loss.item() == pytest.approx((0.30 + 0.10) / 2 + bce, abs=1e-6)
    assert parts["preference"].item() == pytest.approx(bce, abs=1e-6)
    assert parts["denoising"].item() == pytest.approx(0.20, abs=1e-7)
    assert parts["delta"].item() == pytest.approx(sum(delta) / 2, abs=1e-7)


def test_labels_are_bradley_terry_probabilities_of_the_reward_difference():
    reference_rewards = torch.tensor([[0.6, 0.4], [0.5, 0.7]])  # [references, prompts]
    negative_rewards = torch.tensor([0.5, 0.3, 0.8])
    prompt_index = torch.tensor([0, 0, 1])  # the first two negatives come from prompt 0
    p = label_probabilities(reference_rewards, negative_rewards, prompt_index)
    expected = [[0.6 - 0.5, 0.6 - 0.3, 0.4 - 0.8], [0.5 - 0.5, 0.5 - 0.3, 0.7 - 0.8]]
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor(expected)))


# ----------------------------------------------------------------------------------------------------------------
# Training


def preference_margin(trainer) -> float:
    """Mean Δ over every (reference, negative) pair at fixed noise and timesteps: how much more the model has
    improved on the references than on the negatives, relative to the pretrained model."""
    references, negatives = len(trainer.reference_latents), len(trainer.negatives.latents)
    latents = torch.cat([trainer.reference_latents.repeat_interleave(negatives, 0),
                         trainer.negatives.latents.repeat(references, 1, 1, 1)])  # fmt: skip
    embeds = torch.cat([trainer.instance_embeds.expand(references * negatives, -1, -1),
                        trainer.prompt_embeds[trainer.negatives.prompt_index.repeat(references)]])  # fmt: skip
    noisy, timesteps, target = trainer.noised(latents, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = trainer.denoising_losses(trainer.pipe.unet, noisy, timesteps, embeds, target)
        with trainer.pretrained_unet() as unet:
            pretrained = trainer.denoising_losses(unet, noisy, timesteps, embeds, target)
    pairs = references * negatives
    _, parts = rpo_loss(model[:pairs], model[pairs:], pretrained[:pairs], pretrained[pairs:], torch.ones(pairs))
    return parts["delta"].item()


def test_labels_are_sampled_and_all_ones_pull_the_model_toward_the_references(tmp_path):
    trainer = RPOTrainer(small_config(tmp_path / "a", "learning_rate=0.01", "train_batch_size=4"))
    p = trainer.preference_probabilities
    assert p.shape == (4, 4) and ((p > 0.26) & (p < 0.74)).all(), "4 references × 4 negatives; rewards lie in [0, 1]"
    initial = {name: value.detach().clone() for name, value in lora_parameters(trainer.pipe.unet).items()}
    trainer.preference_probabilities = torch.full((4, 4), 0.25)
    drawn = torch.cat([trainer.draw_pairs()[2] for _ in range(500)])
    assert set(drawn.tolist()) == {0.0, 1.0} and abs(drawn.mean().item() - 0.25) < 0.04, "Bernoulli, not a threshold"

    def train(trainer, label: float):
        trainer.preference_probabilities = torch.full((4, 4), label)
        trainer.rng.seed(1)
        trainer.generator.manual_seed(1)
        steps = [trainer.training_step() for _ in range(8)]
        assert all(step["label_mean"] == label for step in steps)
        return steps

    before = trainer.reference_loss()
    assert preference_margin(trainer) == 0.0, "a fresh LoRA is the pretrained model"
    preferred = train(trainer, 1.0)
    assert preferred[0]["delta"] == 0.0
    assert trainer.reference_loss() < 0.8 * before, "the references' denoising improves"
    margin = preference_margin(trainer)
    assert margin > 0, "more on the references than on the negatives"

    # The labels' direction where it is exact: from the pretrained model (Δ = 0, σ(Δ) = 1/2), one plain gradient
    # step (no clipping) moves the parameters by −η(∇ℓ_denoising + (1/2 − y)·∇Δ), so on the same pairs, noise and
    # timesteps, labels 1 leave a larger Δ than labels 0, by η·‖∇Δ‖². (Adam's per-element scaling over several
    # steps, or Δ on other noise, makes the comparison depend on the random model.)
    reset_accelerate()
    plain = RPOTrainer(small_config(tmp_path / "plain", "learning_rate=0.01", "train_batch_size=4", "max_grad_norm=null",
                                    cache=tmp_path / "a" / "negatives"))  # fmt: skip
    deltas = {}
    for label in (1.0, 0.0):
        with torch.no_grad():
            for name, parameter in lora_parameters(plain.pipe.unet).items():
                parameter.copy_(initial[name])
        plain.optimizers["unet"] = torch.optim.SGD(lora_parameters(plain.pipe.unet).values(), lr=1e-3)
        plain.preference_probabilities = torch.full((4, 4), label)
        for _ in range(2):  # the second step reports Δ of the first one's batch after the first update
            plain.rng.seed(1)
            plain.generator.manual_seed(1)
            deltas[label] = plain.training_step()["delta"]
    assert deltas[1.0] > deltas[0.0], f"labels 0 prefer the negatives' denoising: {deltas}"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run whose validation scores are replaced by a constructed sequence, with patience 2: the best step is 4,
    then 6 and 8 do not improve, so it stops after step 8 of 12."""
    folder = tmp_path_factory.mktemp("rpo-run")
    trainer = RPOTrainer(small_config(folder, "max_steps=12", "patience=2", "learning_rate=0.003"))
    scores = iter([0.50, 0.60, 0.80, 0.70, 0.75, 0.99])  # steps 0, 2, 4, 6, 8 (10 never comes)
    snapshots = {}
    validate = trainer.validate

    def constructed_validate():
        snapshots[trainer.iteration] = {k: v.detach().clone() for k, v in lora_parameters(trainer.pipe.unet).items()}
        return {**validate(), "validation/lambda_harmonic": next(scores)}

    trainer.validate = constructed_validate
    results = trainer.run()
    reset_accelerate()
    return folder / "run", results, snapshots


def test_early_stopping_keeps_the_weights_of_the_best_validation(finished_run):
    run, results, snapshots = finished_run
    assert results["best"] == {"step": 4, "score": 0.80} and results["stopped_early"] and results["steps"] == 8
    assert [v["step"] for v in results["validations"]] == [0, 2, 4, 6, 8] and sorted(snapshots) == [0, 2, 4, 6, 8]
    saved = load_file(run / "bundle" / "pytorch_lora_weights.safetensors")
    best = {"unet." + name.replace(".default", ""): value for name, value in snapshots[4].items()}
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[name], best[name]) for name in saved), "the bundle holds step 4's LoRA"
    assert not all(torch.equal(snapshots[4][k], snapshots[8][k]) for k in snapshots[4]), "training went on after it"
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == list(range(1, 9))


def test_the_bundle_loads_in_parrot_and_stock_diffusers_and_says_how_to_prompt(finished_run):
    run, results, _ = finished_run
    bundle = run / "bundle"
    saved = json.loads((bundle / "parrot_config.json").read_text())
    assert saved["method"] == "rpo" and saved["extra"]["identifier"] == "sks" and saved["extra"]["class_noun"] == "clock"
    assert saved["expansion_guidance_scale"] == 0.0 and saved["reward_names"] == ["lambda_harmonic"]
    ours = load(saved["base_model"])
    ours.load_parrot_weights(bundle)
    stock = StableDiffusionPipeline.from_pretrained(saved["base_model"])
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(bundle)
    base = load(saved["base_model"])

    def kwargs():
        return {"num_inference_steps": 3, "guidance_scale": 5.0, "generator": seeded(), "output_type": "np",
                "height": 32, "width": 32}  # fmt: skip

    prompt = "a sks clock in a flower garden"
    image = ours(prompt, **kwargs()).images
    np.testing.assert_allclose(image, stock(prompt, **kwargs()).images, atol=1e-5)
    assert np.abs(image - base(prompt, **kwargs()).images).max() > 1e-3, "the LoRA changes the images"

    card = (bundle / "README.md").read_text()
    assert "subject-driven preference fine-tuning" in card and "a sks clock on a beach" in card
    assert "| 4 (best) |" in card and "| `patience` | `2` |" in card
    assert (bundle / "samples" / "validation_step_000004.png").is_file()
    assert (run / "plots" / "validation.png").stat().st_size > 0 and (run / "samples" / "negatives.png").is_file()
    assert json.loads((run / "rpo.json").read_text())["best"]["step"] == 4
    validations = [r for r in records(run) if "validation/lambda_harmonic" in r]
    assert [v["validation/lambda_harmonic"] for v in validations] == [0.50, 0.60, 0.80, 0.70, 0.75]
    assert all(0 < v["validation/subject_fidelity"] <= 1 and 0 < v["validation/text_alignment"] <= 1
               for v in validations)  # fmt: skip


def test_negatives_are_cached_on_disk_and_reused(tmp_path, monkeypatch):
    first = RPOTrainer(small_config(tmp_path / "a", cache=tmp_path / "cache"))
    assert first.negatives.images.shape == (4, 3, 32, 32) and first.negatives.prompt_index.tolist() == [0, 0, 1, 1]
    assert (first.negatives.folder / "grid.png").is_file()
    reset_accelerate()

    def no_generation(self):
        raise AssertionError("negatives generated again")

    monkeypatch.setattr(RPOTrainer, "_generate_negatives", no_generation)
    second = RPOTrainer(small_config(tmp_path / "b", cache=tmp_path / "cache"))
    assert second.negatives.folder == first.negatives.folder
    assert torch.equal(second.negatives.latents, first.negatives.latents)
    reset_accelerate()
    with pytest.raises(AssertionError, match="generated again"):  # other settings: another cache entry
        RPOTrainer(small_config(tmp_path / "c", "negatives_per_prompt=3", cache=tmp_path / "cache"))


def test_a_run_stopped_by_sigterm_and_resumed_repeats_the_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    whole = RPOTrainer(small_config(tmp_path / "whole", cache=cache))
    whole.train_loop()
    reset_accelerate()

    interrupted = RPOTrainer(small_config(tmp_path / "cut", cache=cache))
    step = interrupted.training_step

    def step_then_signal():
        record = step()
        if interrupted.iteration == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the first step
        return record

    interrupted.training_step = step_then_signal
    with pytest.raises(SystemExit) as stopped:
        interrupted.train_loop()
    assert stopped.value.code == 128 + signal.SIGTERM
    run = tmp_path / "cut" / "run"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000001"]
    reset_accelerate()

    resumed = RPOTrainer(small_config(tmp_path / "cut", "resume=true", cache=cache))
    assert resumed.iteration == 1
    resumed.train_loop()
    expected, got = records(tmp_path / "whole" / "run"), records(run)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1, 2, 2, 3, 4, 4]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "delta", "label_mean", "validation/lambda_harmonic", "validation/reference_loss"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (mine["step"], key)
    final, reference = lora_parameters(resumed.pipe.unet), lora_parameters(whole.pipe.unet)
    assert all(torch.allclose(final[name], reference[name], atol=1e-6) for name in reference)
    assert resumed.best == whole.best


def test_resume_refuses_other_subject_settings(tmp_path, monkeypatch):
    trainer = RPOTrainer(small_config(tmp_path, "max_steps=1"))
    trainer.train_loop()
    reset_accelerate()
    monkeypatch.setattr("train.run.ParrotPipeline.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="identifier: checkpoint 'sks', now 'zwx'"):
        RPOTrainer(small_config(tmp_path, "resume=true", "identifier=zwx", "instance_prompt=a photo of zwx clock"))


@pytest.mark.parametrize("precision", ["'no'", "bf16"])  # quoted: YAML reads a bare no as false
def test_the_whole_unet_variant_trains_every_weight_against_a_frozen_copy(tmp_path, hub, precision):
    trainer = RPOTrainer(small_config(tmp_path, "full_unet=true", "max_steps=2", "learning_rate=0.001",
                                      f"mixed_precision={precision}", "push_to_hub=me/rpo-whole"))  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.pipe.unet.named_parameters()}
    results = trainer.run()
    assert records(tmp_path / "run")[1]["delta"] == 0.0, "the frozen copy equals the model before the first step"
    changed = [name for name, p in trainer.pipe.unet.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) > 0.9 * len(before), "every weight trains"
    assert all(torch.equal(p, before[name]) for name, p in trainer.frozen_unet.named_parameters())

    model = tmp_path / "run" / "model"
    assert results["output"] == str(model) and not (tmp_path / "run" / "bundle").exists()
    saved = json.loads((model / "parrot_config.json").read_text())
    assert saved["method"] == "rpo" and saved["extra"]["identifier"] == "sks"
    loaded = DiffusionPipeline.from_pretrained(model)
    assert isinstance(loaded, StableDiffusionPipeline)
    for name, parameter in loaded.unet.named_parameters():
        torch.testing.assert_close(parameter, trainer.best_weights[name], rtol=0, atol=0)
    loaded.set_progress_bar_config(disable=True)
    assert loaded("a sks clock", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    assert "a sks clock in the snow" in (model / "README.md").read_text()
    files = hub.repos["me/rpo-whole"]["files"]
    assert files["model_index.json"] == (model / "model_index.json").read_bytes() and "parrot_config.json" in files


def test_a_run_pushes_its_bundle_to_the_hub(tmp_path, hub):
    results = RPOTrainer(small_config(tmp_path, "max_steps=2", "push_to_hub=me/rpo-clock")).run()
    assert results["hub"]["url"].startswith(f"{hub.endpoint}/me/rpo-clock/commit/")
    files = hub.repos["me/rpo-clock"]["files"]
    assert "pytorch_lora_weights.safetensors" in files and "method-rpo" in files["README.md"].decode()


def test_two_processes_train_the_same_weights_and_one_writes(tmp_path):
    repository = Path(__file__).resolve().parents[1]
    command = two_process_launch("tests/rpo_multiprocess_run.py", str(tmp_path), "device=cpu",
                                 *small_overrides(tmp_path, tmp_path / "negatives")[2:])  # fmt: skip
    result = subprocess.run(command, cwd=repository, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repository)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (load_file(tmp_path / f"weights_rank{rank}.safetensors") for rank in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [r["step"] for r in records(tmp_path / "run")] == [0, 1, 2, 2, 3, 4, 4], "one process writes the metrics"
    assert (tmp_path / "run" / "bundle" / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Input


def test_reference_images_are_read_upright_whatever_their_format_and_size():
    images = read_subject_images(SUBJECT, "config `references`")
    assert [image.size for image in images] == [(96, 96), (120, 88), (88, 112), (80, 80)]
    assert Image.open(f"{SUBJECT}/02.jpg").size == (112, 88), "stored sideways with an EXIF orientation tag"
    upright = np.asarray(images[2])
    assert upright[18, 44].tolist() == pytest.approx([200, 30, 40], abs=40), "the red rim at the top, as drawn"


def bad_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind != "empty":
        for index, image in enumerate(read_subject_images(SUBJECT, "x")[:2]):
            image.save(folder / f"{index}.png")
    if kind == "text":
        (folder / "notes.txt").write_text("not an image")
    if kind == "truncated":
        data = (folder / "1.png").read_bytes()
        (folder / "1.png").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda t: [f"references={bad_folder(t, 'empty')}"], r"`references`: '.*empty' holds no images"),
        (lambda t: [f"references={bad_folder(t, 'text')}"], r"notes\.txt is not an image file"),
        (lambda t: [f"references={bad_folder(t, 'truncated')}"], r"truncated/1\.png: not a readable image"),
        (lambda t: ["references=/nowhere/at/all"], r"`references`: '/nowhere/at/all' is not a folder"),
        (lambda t: ["references=null"], r"`references` = None is not allowed"),
        (lambda t: ["instance_prompt=a photo of a clock"], r"`instance_prompt` = 'a photo of a clock' is not allowed: "
                                                           r"a prompt containing the identifier 'sks'"),
        (lambda t: ["label_lambda=1.5"], r"`label_lambda` = 1.5 is not allowed: λ in \[0, 1\]"),
        (lambda t: ["validation_lambda=-0.1"], r"`validation_lambda` = -0.1 is not allowed: λ in \[0, 1\]"),
        (lambda t: [f"validation_prompts={write(t / 'one.txt', 'a {} in a garden')}"],
         r"`validation_prompts`: .*one\.txt holds 1 prompt; early stopping needs at least 2"),
        (lambda t: [f"prompts={write(t / 'p.txt', 'a {} in a garden', 'a red car')}"],
         r"prompt 2 of .*p\.txt, 'a red car', does not name the subject"),
        (lambda t: ["reward_options={model: tiny, lam: 0.3}"], r"not \['lam'\]"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, setup, message):
    monkeypatch.setattr("train.run.ParrotPipeline.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["--config", "configs/rpo_quickstart.yaml", f"output_dir={output}", *setup(tmp_path)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m train.rpo: error:")
    assert re.search(message, error), error
    assert not output.exists()


def write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path
