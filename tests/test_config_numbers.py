"""Numbers in configs and ``key=value`` overrides read as people type them (``1e-5``, ``3E-4``), for every float
field of the Parrot and RPO configs, and non-finite values refused by name; on the command line too."""

import dataclasses
import typing

import pytest

from train.__main__ import main as train_main
from train.config import TrainConfig, load_config, read_yaml
from train.rpo import RPOConfig
from train.rpo import main as rpo_main

PRESETS = {TrainConfig: "configs/quickstart.yaml", RPOConfig: "configs/rpo_quickstart.yaml"}


def float_fields(config_class) -> list[tuple[str, float | None]]:
    """Every field whose type admits a float (``float``, ``float | None``, ``list[float]``), with its default."""
    hints = typing.get_type_hints(config_class)
    fields = []
    for field in dataclasses.fields(config_class):
        options = typing.get_args(hints[field.name]) or (hints[field.name],)
        if float in options or any(typing.get_args(option) == (float,) for option in options):
            fields.append(field.name)
    return fields


def exponent_spelling(value: float) -> str:
    """``value`` written with an exponent and no dot where it can be, as people type it: 0.01 → "1e-02"."""
    mantissa, exponent = f"{value:.12e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def valid_value(config_class, name: str) -> float:
    preset = load_config(PRESETS[config_class], [], config_class)
    value = getattr(preset, name)
    return 1.0 if value is None else value


CASES = [(cls, name) for cls in PRESETS for name in float_fields(cls) if name != "reward_weights"]


def test_the_enumeration_finds_the_float_fields():
    assert {"learning_rate", "clip_range", "kl_beta", "collapse_margin", "lora_alpha"} <= set(float_fields(TrainConfig))
    assert {"learning_rate", "label_lambda", "max_grad_norm"} <= set(float_fields(RPOConfig))


@pytest.mark.parametrize("config_class, name", CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_every_float_field_reads_exponents_and_refuses_non_finite_values(config_class, name):
    value = valid_value(config_class, name)
    spelled = exponent_spelling(value)
    assert getattr(load_config(PRESETS[config_class], [f"{name}={spelled}"], config_class), name) == pytest.approx(value)
    assert getattr(load_config(PRESETS[config_class], [f"{name}={spelled.upper()}"], config_class), name) == pytest.approx(value)
    for bad in ("inf", "-inf", "nan", ".inf"):
        with pytest.raises(ValueError, match=f"config `{name}"):
            load_config(PRESETS[config_class], [f"{name}={bad}"], config_class)


def test_yaml_files_read_exponents_as_numbers_everywhere(tmp_path):
    assert read_yaml("a: 1e-5\nb: [3E-4, 2]\nc: {lam: 5e-1}\nd: 1e5x\ne: 12") == {
        "a": 1e-5, "b": [3e-4, 2], "c": {"lam": 0.5}, "d": "1e5x", "e": 12}  # fmt: skip
    preset = tmp_path / "mine.yaml"
    preset.write_text("mode: ddpo\nexpander_model: null\nlearning_rate: 3e-4\nreward_weights: [7e-1, 3e-1]\n")
    config = load_config(preset)
    assert config.learning_rate == 3e-4 and config.reward_weights == [0.7, 0.3]
    with pytest.raises(ValueError, match=r"config `reward_weights` = \[0.5, nan\] is not allowed: finite numbers"):
        load_config(preset, ["reward_weights=[0.5, nan]"])


def test_words_stay_refused(capsys):
    with pytest.raises(TypeError, match="config `learning_rate` must be float, got 'fast' \\(str\\)"):
        load_config("configs/quickstart.yaml", ["learning_rate=fast"])


@pytest.mark.parametrize("main, preset", [(train_main, "configs/quickstart.yaml"), (rpo_main, "configs/rpo_quickstart.yaml")])
def test_the_command_line_reads_exponents(main, preset, capsys):
    # a valid learning rate in exponent form, then a bad count: the only complaint is the count's
    with pytest.raises(SystemExit) as exit_:
        main(["--config", preset, "learning_rate=1e-5", "adam_epsilon=1E-8", "train_batch_size=0"])
    assert exit_.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config `train_batch_size` = 0 is not allowed: an integer ≥ 1" in last_line
    with pytest.raises(SystemExit) as exit_:
        main(["--config", preset, "learning_rate=nan"])
    assert exit_.value.code == 2
    assert "config `learning_rate` = nan is not allowed: a finite number > 0" in capsys.readouterr().err
