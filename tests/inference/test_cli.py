"""The parrot-generate command."""

import numpy as np
import pytest
from PIL import Image

from parrot_pipeline.cli import main

from ..helpers import STEPS, load, seeded


def test_generate_with_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["--prompt", "a cat", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expanded = printed.split("expanded prompt:")[1].splitlines()[0].strip()
    assert expanded and expanded != "(none: plain guidance)"
    assert Image.open(out).size == (64, 64)


def test_generate_with_model_and_bundle_matches_the_pipeline(tiny_sd, bundle_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    args = ["--model", str(tiny_sd), "--bundle", str(bundle_dir), "--prompt", "a red fox", "--seed", "7"]
    assert main([*args, "--steps", str(STEPS), "--guidance-scale", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pipe = load(tiny_sd)
    pipe.load_parrot_weights(bundle_dir)
    expected = pipe("a red fox", guidance_scale=4.0, num_inference_steps=STEPS, generator=seeded(7))
    assert f"expanded prompt: {expected.expanded_prompts[0]}" in printed
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "65"], "--height must be a positive multiple of 8, got 65"),
        (["--guidance-scale", "-2"], "`--guidance-scale` must be a finite number ≥ 0, got -2.0"),
        (["--bundle", "./missing-bundle-folder"], "neither an existing local folder"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
