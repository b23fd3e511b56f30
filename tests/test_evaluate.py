"""``python -m train.evaluate``: rows and scores, statistics, resuming, the ablation configurations, bad input."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import train.evaluate
from train.evaluate import main, read_reward_options, reward_statistics
from train.prompts import read_prompts
from train.rewards import REGISTRY, RewardInfo, resolve_reward, score_images

import tests.reward_probes as probes

from .helpers import load, seeded

PROMPTS = ["a red fox in the snow", "a lighthouse in a storm"]
STEPS = "2"
REWARDS = "colorfulness,sharpness,tests.reward_probes:expansion_length"


@pytest.fixture(autouse=True)
def _reset_calls():
    probes.expansion_calls.clear()
    probes.interrupt_at_call = None


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def run_args(tiny_sd, bundle_dir, prompt_file, output_dir, *extra):
    return ["--model", str(tiny_sd), "--bundle", str(bundle_dir), "--prompts", str(prompt_file), "--rewards", REWARDS,
            "--seeds", "2", "--steps", STEPS, "--batch-size", "3", "--output-dir", str(output_dir), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tiny_sd, bundle_dir, prompt_file, tmp_path_factory):
    """An uninterrupted run: base and bundle, 2 prompts × 2 seeds, batches of 3."""
    output_dir = tmp_path_factory.mktemp("evaluation") / "run"
    assert main(run_args(tiny_sd, bundle_dir, prompt_file, output_dir)) == 0
    return output_dir


def read_rows(output_dir: Path) -> list[dict]:
    with open(output_dir / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def image_tensor(path: Path) -> torch.Tensor:
    return pil_to_tensor(Image.open(path)).float().unsqueeze(0) / 255


def test_results_rows_scores_and_images(evaluated, tiny_sd, bundle_dir):
    rows = read_rows(evaluated)
    assert [(r["configuration"], r["prompt"], r["seed"]) for r in rows] == [
        (c, p, str(s)) for c in ("base", "bundle") for p in PROMPTS for s in (0, 1)
    ]
    assert {(r["guidance_scale"], r["expansion_guidance_scale"]) for r in rows if r["configuration"] == "bundle"} == {
        ("5.0", "5.0")
    }
    assert all(r["expanded_prompt"] == "" for r in rows if r["configuration"] == "base")
    bundle_rows = [r for r in rows if r["configuration"] == "bundle"]
    assert all(r["expanded_prompt"].startswith("<reward 1>, <reward 2>, <reward 3>, ") for r in bundle_rows)

    # Each value is the reward of the saved image, scored directly (alone: equal up to float32 rounding, which
    # depends on the batch); the metadata belongs to the image's own row.
    rewards = {name: resolve_reward(name) for name in ("colorfulness", "sharpness")}
    for row in rows:
        scores = score_images(rewards, image_tensor(evaluated / row["image"]), [row["prompt"]], {})[0]
        assert [float(row["colorfulness"]), float(row["sharpness"])] == pytest.approx(scores.tolist(), rel=1e-5)
        assert float(row["tests.reward_probes:expansion_length"]) == len(row["expanded_prompt"] or row["prompt"])

    # The bundle's image of a (prompt, seed) is what the pipeline makes for that prompt and seed alone.
    pipe = load(tiny_sd)
    pipe.load_parrot_weights(bundle_dir)
    row = bundle_rows[-1]
    expected = pipe(row["prompt"], num_inference_steps=int(STEPS), generator=seeded(int(row["seed"])))
    assert row["expanded_prompt"] == expected.expanded_prompts[0]
    np.testing.assert_array_equal(np.asarray(Image.open(evaluated / row["image"])), np.asarray(expected.images[0]))
    assert Image.open(evaluated / "grid.png").size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 2 prompts × 2 configurations


def test_summary_equals_a_hand_computation(evaluated):
    rows = read_rows(evaluated)
    summary = (evaluated / "summary.md").read_text()
    for name in ("colorfulness", "sharpness"):
        values = {(r["configuration"], r["prompt"], r["seed"]): float(r[name]) for r in rows}
        base = [v for (c, *_), v in values.items() if c == "base"]
        bundle = {(p, s): v for (c, p, s), v in values.items() if c == "bundle"}
        wins = sum(1.0 if bundle[p, s] > v else 0.5 if bundle[p, s] == v else 0.0
                   for (c, p, s), v in values.items() if c == "base")  # fmt: skip
        mean, error = statistics.mean(bundle.values()), statistics.stdev(bundle.values()) / 2
        assert f"| bundle | {mean:.4g} ± {error:.2g} | 4 | {100 * wins / 4:.1f}% of 4 |" in summary
        base_line = f"| base | {statistics.mean(base):.4g} ± {statistics.stdev(base) / 2:.2g} | 4 | — |"
        assert base_line in summary


def test_reward_statistics_by_hand(monkeypatch):
    monkeypatch.setitem(REGISTRY, "smaller", RewardInfo("smaller", lambda: None, "", "", higher_is_better=False))
    base, other = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 5.0, 1.0]
    records = [
        {"configuration": label, "prompt_index": i, "seed": 0, "rewards": {"larger": v, "smaller": v}}
        for label, values in (("base", base), ("other", other)) for i, v in enumerate(values)
    ]  # fmt: skip
    records.append({"configuration": "other", "prompt_index": 4, "seed": 0, "rewards": {"larger": math.nan,
                                                                                     "smaller": math.nan}})  # fmt: skip
    result = reward_statistics(records, ["larger", "smaller"])
    assert result["larger"]["base"]["mean"] == 2.5
    assert result["larger"]["base"]["standard_error"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert "win_rate" not in result["larger"]["base"]
    assert result["larger"]["other"]["n"] == 4  # the NaN is left out
    assert result["larger"]["other"]["win_rate"] == 2.5 / 4  # two wins, one tie, one loss
    assert result["smaller"]["other"]["win_rate"] == 1.5 / 4  # lower is better: one win, one tie
    assert result["larger"]["other"]["pairs"] == 4


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(
    evaluated, tiny_sd, bundle_dir, prompt_file, tmp_path, capsys
):
    output_dir = tmp_path / "run"
    args = run_args(tiny_sd, bundle_dir, prompt_file, output_dir)
    probes.interrupt_at_call = 3  # while scoring the bundle's first batch
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 130
    assert "run the same command to resume" in capsys.readouterr().err
    assert sorted(p.name for p in (output_dir / "images").glob("*/*.json")) == [
        "00000-seed0.json", "00000-seed1.json", "00001-seed0.json", "00001-seed1.json"
    ]  # fmt: skip
    assert not (output_dir / "images" / "bundle").exists() or not any((output_dir / "images" / "bundle").iterdir())
    assert not (output_dir / "results.csv").exists()

    probes.expansion_calls.clear()
    probes.interrupt_at_call = None
    assert main(args) == 0
    assert probes.expansion_calls == [3, 1]  # only the bundle's four images are scored
    for name in ("results.csv", "summary.md", "grid.png", "run.json"):
        assert (output_dir / name).read_bytes() == (evaluated / name).read_bytes(), name
    for image in (evaluated / "images").glob("*/*"):
        assert (output_dir / image.relative_to(evaluated)).read_bytes() == image.read_bytes()

    probes.expansion_calls.clear()
    assert main(args) == 0  # complete: nothing to generate, the same files again
    assert probes.expansion_calls == []
    assert (output_dir / "results.csv").read_bytes() == (evaluated / "results.csv").read_bytes()


def test_a_folder_of_other_settings_is_refused(evaluated, tiny_sd, bundle_dir, prompt_file, capsys):
    before = sorted(evaluated.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tiny_sd, bundle_dir, prompt_file, evaluated, "--steps", "3"))
    assert exit_info.value.code == 2
    assert "other settings (steps differ)" in capsys.readouterr().err
    assert sorted(evaluated.rglob("*")) == before


def test_without_expansion_the_bundle_is_the_base_pipeline_with_its_lora(tiny_sd, bundle_dir, prompt_file, tmp_path):
    output_dir = tmp_path / "run"
    args = ["--model", str(tiny_sd), "--bundle", str(bundle_dir), "--prompts", str(prompt_file), "--max-prompts",
            "1", "--rewards", "colorfulness", "--seeds", "2", "--steps", STEPS, "--batch-size", "2",
            "--configs", "base,bundle,bundle-no-expansion", "--guidance-grid", "5:0,3:0",
            "--output-dir", str(output_dir)]  # fmt: skip
    assert main(args) == 0
    rows = read_rows(output_dir)
    assert [r["configuration"] for r in rows[::2]] == ["base", "bundle@5:0", "bundle@3:0", "bundle-no-expansion"]

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd)
    stock.set_progress_bar_config(disable=True)

    def stock_images(guidance_scale):
        out = stock([PROMPTS[0]] * 2, guidance_scale=guidance_scale, num_inference_steps=int(STEPS),
                    generator=[seeded(0), seeded(1)])  # fmt: skip
        return [np.asarray(image) for image in out.images]

    def ours(configuration):
        return [np.asarray(Image.open(output_dir / r["image"])) for r in rows if r["configuration"] == configuration]

    np.testing.assert_array_equal(ours("base"), stock_images(5.0))
    stock.load_lora_weights(str(bundle_dir))
    with_lora = stock_images(5.0)
    np.testing.assert_array_equal(ours("bundle-no-expansion"), with_lora)
    np.testing.assert_array_equal(ours("bundle@5:0"), with_lora)
    np.testing.assert_array_equal(ours("bundle@3:0"), stock_images(3.0))
    assert not np.array_equal(ours("base"), with_lora)  # the LoRA changes the images


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "no_prompt.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    (tmp_path / "no_column.csv").write_text("caption,category\na cat,animals\n")
    (tmp_path / "ok.txt").write_text("a cat\n")
    (tmp_path / "not_empty").mkdir()
    (tmp_path / "not_empty" / "notes.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "missing.txt"], "Prompt file 'BAD/missing.txt' does not exist"),
        (["--prompts", "empty.txt"], "Prompt file 'BAD/empty.txt' holds no prompts"),
        (["--prompts", "no_prompt.jsonl"], "no_prompt.jsonl:2: each line must be a JSON object with a string field "
                                           "'prompt'"),  # fmt: skip
        (["--prompts", "no_column.csv"], "has no prompt column; name it one of ['prompt', 'Prompt', 'Prompts']"),
        (["--rewards", "colourfulness"], "Unknown reward 'colourfulness'. Did you mean 'colorfulness'?"),
        (["--rewards", "colorfulness,colorfulness"], "--rewards must list distinct reward names"),
        (["--reward-options", '{"clip_score": {}}'], "--reward-options names rewards ['clip_score'] that are not in"),
        (["--reward-options", "{oops"], "--reward-options is not valid JSON"),
        (["--reward-options", "options.yaml"], "--reward-options 'options.yaml' is neither a JSON object nor an"),
        (["--reward-options", '{"colorfulness": {"scale": 2}}'], "Invalid `reward_options` for reward 'colorfulness'"),
        (["--guidance-grid", "5"], "argument --guidance-grid: '5' is not a W1:W2 pair"),
        (["--guidance-grid", "5:-1"], "argument --guidance-grid: '5:-1' is not a W1:W2 pair"),
        (["--guidance-grid", "5:5,5:5"], "argument --guidance-grid: '5:5,5:5' repeats a pair"),
        (["--configs", "base", "--guidance-grid", "5:5"], "--guidance-grid runs the 'bundle' configuration"),
        (["--configs", "base", "--expansion-guidance-scale", "3"], "--expansion-guidance-scale sets w2 of the"),
        (["--configs", "base,trained"], "--configs: unknown configuration 'trained'"),
        (["--configs", "bundle"], "--configs: configuration 'bundle' needs --bundle"),
        (["--seeds", "0"], "argument --seeds: must be an integer ≥ 1, got 0"),
        (["--height", "60"], "--height must be a positive multiple of 8, got 60"),
        (["--guidance-scale", "-1"], "`--guidance-scale` must be a finite number ≥ 0, got -1.0"),
        (["--steps", "0"], "--steps must be ≥ 1, got 0"),
        (["--device", "cuda:0"], "--device 'cuda:0': no CUDA device is available"),
        (["--output-dir", "not_empty"], "--output-dir 'BAD/not_empty' is not empty and holds no evaluation"),
    ],
)
def test_bad_input_fails_before_any_model_loads(bad_files, monkeypatch, capsys, args, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    monkeypatch.setattr(train.evaluate, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(bad_files)
    base = ["--prompts", "ok.txt", "--rewards", "colorfulness", "--output-dir", "out"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + [a.replace("BAD/", "") for a in args])
    assert exit_info.value.code == 2
    assert message.replace("BAD/", "") in capsys.readouterr().err
    assert not (bad_files / "out").exists()


def test_prompt_files_of_benchmarks(tmp_path):
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
                     'a "quoted" word, with a comma\tWorld Knowledge\tPerspective\tnote\n')  # fmt: skip
    assert read_prompts(parti) == ["bond", 'a "quoted" word, with a comma']
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text('Prompts,Category\n"A red colored car, parked.",Colors\n,\nA black apple.,Colors\n')
    assert read_prompts(drawbench) == ["A red colored car, parked.", "A black apple."]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": " a cat ", "id": 1}\n\n{"prompt": "a dog"}\n')
    assert read_prompts(jsonl) == ["a cat", "a dog"]


def test_reward_options_as_json_or_a_file(tmp_path):
    expected = {"clip_score": {"scale_100": True, "model": "local-dir:/models/clip"}}
    (tmp_path / "options.yaml").write_text("clip_score:\n  scale_100: true\n  model: local-dir:/models/clip\n")
    (tmp_path / "options.json").write_text(json.dumps(expected))
    for source in (json.dumps(expected), str(tmp_path / "options.yaml"), str(tmp_path / "options.json")):
        assert read_reward_options(source, ["clip_score", "colorfulness"]) == expected


@pytest.mark.parametrize("name", ["animals", "activities", "scenes"])
def test_shipped_prompt_sets(name):
    prompts = read_prompts(f"train/data/eval/{name}.txt")
    assert 20 <= len(prompts) <= 30 and len(set(prompts)) == len(prompts)
