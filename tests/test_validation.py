"""Validation during training: the selected iterate (and that the bundle is its weights), early stopping, the
collapse guard's warn / stop / rollback, and the rules themselves on hand-made records."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from train.config import load_config
from train.parrot import Trainer, lora_parameters
from train.validation import BestIterate, RewardValidation

REWARDS = ["jpeg_compressibility", "colorfulness"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def config(tmp_path, *overrides):
    return load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", "images_per_prompt=4", "num_inference_steps=3", "eval_every=0",
        "eval_images_per_prompt=1", "validation_images_per_prompt=1", "expander_sft_epochs=1",
        "expander_max_new_tokens=8", "validate_every=1", *overrides,
    ])  # fmt: skip


def scripted(trainer, values: dict[int, tuple[float, float, float]]):
    """Replace each validation's reward means and hypervolume by ``values[iteration]`` (the images are still drawn and
    scored) and keep a copy of the trained state at every validation."""
    real_validate = trainer.validate
    states = {}

    def validate():
        record = real_validate()
        jpeg, colour, hypervolume = values[trainer.iteration]
        states[trainer.iteration] = trainer.trained_state()
        return {**record, "validation/jpeg_compressibility": jpeg, "validation/colorfulness": colour,
                "validation/hypervolume": hypervolume}  # fmt: skip

    trainer.validate = validate
    return states


def assert_lora_equal(module, saved: dict):
    for name, parameter in lora_parameters(module).items():
        torch.testing.assert_close(parameter.detach().cpu(), saved[name], rtol=0, atol=0)


def test_the_bundle_is_the_selected_iterate_by_its_weights(tmp_path, caplog):
    # iteration 1 and 4 lose colourfulness against the base; of 2 and 3, which keep both, 2 has the higher hypervolume
    values = {0: (-3.9, 88.0, 0.5), 1: (-3.8, 87.0, 0.9), 2: (-3.85, 88.5, 0.7), 3: (-3.7, 89.0, 0.6),
              4: (-3.6, 86.0, 0.95)}  # fmt: skip
    trainer = Trainer(config(tmp_path, "iterations=4"))
    states = scripted(trainer, values)
    with caplog.at_level(logging.WARNING, logger="train.parrot"):
        results = trainer.run()

    assert results["trained"]["iteration"] == 2 and results["last"]["iteration"] == 4
    assert results["selection"]["iteration"] == 2 and results["selection"]["stopped_by"] is None
    assert [r["iteration"] for r in results["selection"]["validations"]] == [0, 1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records if "collapse guard" in r.getMessage()]
    assert len(warnings) == 2 and "iteration 1: colorfulness 87 is below the base model's 88" in warnings[0]
    assert "iteration 4: colorfulness 86" in warnings[1]

    bundle = load_file(tmp_path / "run" / "bundle" / "pytorch_lora_weights.safetensors")
    selected, last = states[2]["weights"]["unet"], states[4]["weights"]["unet"]
    assert len(bundle) == len(selected)
    differs = False
    for name, value in selected.items():
        key = next(k for k in bundle if k.endswith(name.replace(".default", "")))
        torch.testing.assert_close(bundle[key].float(), value, rtol=0, atol=0)
        differs |= not torch.equal(value, last[name])
    assert differs, "the last iterate's weights differ from the selected one's"
    assert_lora_equal(trainer.expander, states[2]["weights"]["expander"])

    card = (tmp_path / "run" / "bundle" / "README.md").read_text()
    assert "This\nbundle is iteration 2 of 4" in card or "bundle is iteration 2 of 4" in card.replace("\n", " ")
    assert "trained (iteration 2, the bundle)" in card and "last (iteration 4)" in card
    lines = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2, 3, 4] and lines[1]["collapsed"] == ["colorfulness"]
    assert (tmp_path / "run" / "plots" / "validation.png").stat().st_size > 0
    assert (tmp_path / "run" / "bundle" / "samples" / "validation.png").is_file()


def test_patience_ends_the_run_and_keeps_the_best(tmp_path):
    values = {0: (-3.9, 88.0, 0.5), 1: (-3.8, 88.5, 0.9), 2: (-3.8, 88.5, 0.8), 3: (-3.8, 88.5, 0.7)}
    trainer = Trainer(config(tmp_path, "iterations=6", "patience=2"))
    scripted(trainer, values)
    results = trainer.run()
    assert trainer.iteration == 3 and results["selection"]["stopped_by"] == "patience"
    assert results["trained"]["iteration"] == 1 and results["last"]["iteration"] == 3
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_guard_stops_a_collapsing_run(tmp_path, caplog):
    values = {0: (-3.9, 88.0, 0.5), 1: (-3.8, 88.5, 0.9), 2: (-4.2, 88.5, 0.8)}
    trainer = Trainer(config(tmp_path, "iterations=5", "collapse_action=stop"))
    scripted(trainer, values)
    with caplog.at_level(logging.WARNING, logger="train.parrot"):
        results = trainer.run()
    assert trainer.iteration == 2 and results["selection"]["stopped_by"] == "collapse"
    assert any("iteration 2: jpeg_compressibility -4.2 is below the base model's -3.9" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert results["trained"]["iteration"] == 1


def test_rollback_restores_the_best_weights_and_moments_and_lowers_the_learning_rate(tmp_path):
    values = {0: (-3.9, 88.0, 0.5), 1: (-3.8, 88.5, 0.9), 2: (-3.8, 87.0, 0.95)}
    trainer = Trainer(config(tmp_path, "iterations=2", "collapse_action=rollback", "rollback_lr_factor=0.25"))
    states = scripted(trainer, values)
    learning_rates = {name: optimizer.param_groups[0]["lr"] for name, optimizer in trainer.optimizers.items()}
    trainer.train_loop()

    assert trainer.validation.records[2]["rolled_back_to"] == 1
    assert_lora_equal(trainer.pipe.unet, states[1]["weights"]["unet"])
    assert_lora_equal(trainer.expander, states[1]["weights"]["expander"])
    for name, optimizer in trainer.optimizers.items():
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * learning_rates[name])
        assert trainer.lr_schedulers[name].base_lrs == [pytest.approx(0.25 * learning_rates[name])]
        for index, moments in states[1]["moments"][name].items():
            torch.testing.assert_close(optimizer.state[optimizer.param_groups[0]["params"][index]]["exp_avg"],
                                       moments["exp_avg"], rtol=0, atol=0)  # fmt: skip


def test_a_resumed_run_keeps_its_validations_and_its_best(tmp_path):
    values = {0: (-3.9, 88.0, 0.5), 1: (-3.8, 88.5, 0.9), 2: (-3.8, 88.5, 0.7), 3: (-3.8, 88.5, 0.6)}
    first = Trainer(config(tmp_path, "iterations=2"))
    states = scripted(first, values)
    first.train_loop()
    first.accelerator.end_training()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(config(tmp_path, "iterations=3", "resume=true"))
    assert [r["iteration"] for r in resumed.validation.records] == [0, 1, 2] and resumed.best.iteration == 1
    assert resumed.validation.scale == first.validation.scale
    scripted(resumed, values)
    resumed.train_loop()
    assert resumed.selected_iteration == 1
    for name, value in states[1]["weights"]["unet"].items():
        torch.testing.assert_close(resumed.best.snapshot["weights"]["unet"][name], value, rtol=0, atol=0)
    lines = (tmp_path / "run" / "validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]


def test_without_validation_the_bundle_is_the_last_iterate(tmp_path):
    trainer = Trainer(config(tmp_path, "iterations=2", "validate_every=0"))
    results = trainer.run()
    assert set(results) == {"base", "trained"} and results["trained"]["iteration"] == 2
    assert not (tmp_path / "run" / "validation.jsonl").exists() or not (tmp_path / "run" / "validation.jsonl").read_text()


# ----------------------------------------------------------------------------------------------------------------
# The rules on hand-made records


def rewards(jpeg: list[float], colour: list[float]) -> torch.Tensor:
    return torch.tensor([jpeg, colour]).T


def test_the_hypervolume_rule_ranks_fewest_rewards_below_base_then_hypervolume():
    validation = RewardValidation(REWARDS, "hypervolume", collapse_margin=None)
    base = validation.record(0, rewards([-4.0, -3.0], [90.0, 80.0]))
    assert validation.scale["low"] == [-4.0, 80.0] and validation.scale["high"] == [-3.0, 90.0]
    # scaled to [0, 1] by the base's range: the base's own points (0, 1) and (1, 0) dominate nothing
    assert base["validation/hypervolume"] == 0.0
    validation.add(base)
    both_up = validation.record(1, rewards([-3.5, -3.0], [90.0, 88.0]))  # scaled (0.5, 1) and (1, 0.8): 0.5 + 0.4·0.5
    assert both_up["validation/hypervolume"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.8)
    one_down = validation.record(2, rewards([-3.0, -3.0], [82.0, 83.0]))  # colour mean 82.5 < base 85
    assert validation.below_base(one_down) == ["colorfulness"] and validation.below_base(both_up) == []
    assert validation.score(both_up) > validation.score(one_down)
    assert validation.score(one_down) == (-1, one_down["validation/hypervolume"])
    assert RewardValidation(REWARDS, "colorfulness", None).score(one_down) == pytest.approx(82.5)


def test_a_non_finite_validation_counts_as_below_the_base_and_ranks_last():
    validation = RewardValidation(REWARDS, "hypervolume", collapse_margin=None)
    validation.add(validation.record(0, rewards([-4.0, -3.0], [80.0, 90.0])))
    broken = validation.record(1, rewards([math.nan, math.nan], [90.0, 90.0]))
    assert validation.below_base(broken) == ["jpeg_compressibility"]
    assert validation.collapsed(broken).keys() == {"jpeg_compressibility"}


def test_the_margin_catches_a_fall_from_the_best_that_stays_above_the_base():
    validation = RewardValidation(REWARDS, "hypervolume", collapse_margin=1.0)
    validation.add(validation.record(0, rewards([-4.0, -3.0], [80.0, 90.0])))  # colour std 7.07
    validation.add(peak := validation.record(1, rewards([-3.5, -3.5], [100.0, 100.0])))
    assert validation.collapsed(peak) == {}
    validation.add(fallen := validation.record(2, rewards([-3.5, -3.5], [92.0, 92.0])))  # 8 below the best, > 1 std
    assert list(validation.collapsed(fallen)) == ["colorfulness"]
    assert "below its best validation, 100" in validation.collapsed(fallen)["colorfulness"]
    validation.collapse_margin = 2.0
    assert validation.collapsed(fallen) == {}


def test_the_base_is_never_the_best_and_patience_counts_validations_since_the_best():
    best = BestIterate(patience=2)
    assert not best.offer(0, 99.0, lambda: "base") and best.iteration is None
    assert best.offer(1, 0.1, lambda: "one") and best.snapshot == "one"
    assert not best.offer(2, 0.1, lambda: "two") and not best.patience_exhausted()  # a tie is not a new best
    assert best.offer(3, 0.2, None) and best.snapshot is None and best.since_best == 0
    best.offer(4, 0.0, None)
    best.offer(5, 0.0, None)
    assert best.patience_exhausted() and best.iteration == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["select_by=sharpness"], "config `select_by` = 'sharpness' is not allowed: null or one of ['hypervolume', 'last', "),
        (["mode=ddpo", "rewards=[colorfulness]", "select_by=hypervolume", "expander_model=null"],
         "a reward's name or last with a single reward ('colorfulness')"),
        (["select_by=last", "collapse_action=rollback"], "need a best iterate"),
        (["select_by=last", "patience=3"], "need a best iterate"),
        (["collapse_action=undo"], "config `collapse_action` = 'undo' is not allowed: use one of ['warn', 'stop', 'rollback']"),
        (["rollback_lr_factor=0.0"], "config `rollback_lr_factor` = 0.0 is not allowed: in (0, 1]"),
        (["collapse_margin=-1.0"], "config `collapse_margin` = -1.0 is not allowed"),
        (["lr_scheduler=warmup"], "config `lr_scheduler` = 'warmup' is not allowed: use one of ['constant', "),
        (["lr_warmup_iterations=60"], "config `lr_warmup_iterations` = 60 is not allowed: fewer than `iterations` (60)"),
        (["validate_every=-1"], "config `validate_every` = -1 is not allowed: an integer ≥ 0"),
    ],
)  # fmt: skip
def test_validation_settings_are_checked(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config("configs/quickstart.yaml", overrides)
    assert message in str(error.value)


def test_validation_prompts_must_not_be_the_held_out_prompts(tmp_path):
    with pytest.raises(ValueError, match=r"`validation_prompts` \(.*\) shares 8 prompt\(s\) with `eval_prompts`"):
        Trainer(config(tmp_path, "validation_prompts=train/data/quickstart_eval_prompts.txt"))
    assert not (tmp_path / "run").exists()


def test_validating_does_not_change_the_training(tmp_path):
    """Validation draws from its own seeded generators: a run with it trains exactly as a run without."""
    weights = []
    for every in (0, 1):
        trainer = Trainer(config(tmp_path / str(every), "iterations=3", f"validate_every={every}"))
        trainer.train_loop()
        weights.append(trainer.trained_state()["weights"])
        trainer.accelerator.end_training()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    for part in ("unet", "expander"):
        for name, value in weights[0][part].items():
            torch.testing.assert_close(weights[1][part][name], value, rtol=0, atol=0)
