"""Checkpoints and resume: exact round trips of every state, atomic writes, broken and foreign checkpoints, and a
resumed run that repeats the uninterrupted one."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train.checkpoint as checkpoint_module
from train.checkpoint import join_state, latest_checkpoint, read_checkpoint, split_state, write_checkpoint
from train.parrot import Trainer, lora_parameters

from .test_train_loop import small_config


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def stepped_optimizer():
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, betas=(0.8, 0.99))
    parameter.sum().backward()
    optimizer.step()
    return optimizer


def test_split_and_join_keep_optimiser_scheduler_and_rng_states_exactly():
    optimizer = stepped_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    python_rng, generator = random.Random(3), torch.Generator().manual_seed(3)
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "python": python_rng.getstate(),
        "numpy": np.random.RandomState(3).get_state(), "generator": generator.get_state(), "nan": float("nan"),
    }  # fmt: skip
    tensors = {}
    structure = json.loads(json.dumps(split_state(state, tensors)))  # what state.json holds
    restored = join_state(structure, tensors)

    assert restored["python"] == state["python"]
    assert restored["numpy"][0] == "MT19937" and np.array_equal(restored["numpy"][1], state["numpy"][1])
    assert restored["numpy"][1].dtype == np.uint32 and restored["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(restored["generator"], state["generator"]) and np.isnan(restored["nan"])
    assert restored["scheduler"] == state["scheduler"]
    assert restored["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(restored["optimizer"]["state"]) == {0}, "integer keys stay integers"
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(restored["optimizer"]["state"][0][key], value)
    again = stepped_optimizer()
    again.load_state_dict(restored["optimizer"])  # loads into a real optimiser


def small_state(value):
    return {"weights": torch.full((4,), float(value)), "iteration": value}


def test_checkpoints_are_pruned_and_a_broken_one_is_skipped_with_a_warning(tmp_path, caplog):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, small_state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]

    newest = tmp_path / "step_000003" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated
    (tmp_path / ".step_000004.tmp-x").mkdir()  # the folder of a write that was killed
    folder, state = latest_checkpoint(tmp_path)
    assert folder.name == "step_000002" and state["iteration"] == 2
    assert str(newest) in caplog.text and "truncated" in caplog.text


def test_a_full_disk_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, 1, small_state(1), keep=2)

    def disk_full(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(OSError, match="step_000001 is intact") as raised:
        write_checkpoint(tmp_path, 2, small_state(2), keep=2)
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"], "no partial folder is left"
    assert read_checkpoint(tmp_path / "step_000001")["iteration"] == 1


def lora_state(trainer):
    modules = [trainer.pipe.unet] + ([trainer.expander] if trainer.expander is not None else [])
    return {f"{i}/{name}": p.detach().clone() for i, m in enumerate(modules) for name, p in lora_parameters(m).items()}


def rewards_of(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["reward/jpeg_compressibility"], r["reward/colorfulness"]) for r in records]


def test_a_run_stopped_by_sigterm_and_resumed_repeats_the_uninterrupted_run(tmp_path):
    overrides = ["iterations=4", "checkpoint_every=3", "advantage=per_prompt", "expander_learning_rate=0.01"]
    whole = Trainer(small_config(tmp_path / "whole", *overrides))
    whole.train_loop()

    interrupted = Trainer(small_config(tmp_path / "cut", *overrides))
    iterate = interrupted.train_iteration

    def iterate_then_signal():
        record = iterate()
        if interrupted.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the second iteration
        return record

    interrupted.train_iteration = iterate_then_signal
    with pytest.raises(SystemExit) as stopped:
        interrupted.train_loop()
    assert stopped.value.code == 128 + signal.SIGTERM
    run = tmp_path / "cut" / "run"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000002"]

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(small_config(tmp_path / "cut", *overrides, "resume=true"))
    assert resumed.iteration == 2
    resumed.train_loop()

    expected, got = rewards_of(tmp_path / "whole" / "run"), rewards_of(run)
    assert [row[0] for row in got] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=1e-6)
    final, reference = lora_state(resumed), lora_state(whole)
    assert final.keys() == reference.keys()
    for name in final:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]


def test_resume_refuses_other_settings_and_foreign_checkpoints_before_loading_models(tmp_path, monkeypatch):
    trainer = Trainer(small_config(tmp_path / "a", "expander_model=null", "iterations=1"))
    trainer.train_loop()
    monkeypatch.setattr("train.run.ParrotPipeline.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))

    with pytest.raises(ValueError) as raised:
        Trainer(small_config(tmp_path / "a", "expander_model=null", "resume=true", "lora_rank=4",
                             "rewards=[colorfulness, jpeg_compressibility]"))  # fmt: skip
    message = str(raised.value)
    assert "lora_rank: checkpoint 8, now 4" in message and "rewards: checkpoint" in message

    # a second run's output_dir holding the first run's checkpoint
    (tmp_path / "b" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run" / "run.json").write_text(json.dumps({"run_id": "another"}))
    shutil.copytree(tmp_path / "a" / "run" / "checkpoints", tmp_path / "b" / "run" / "checkpoints")
    with pytest.raises(ValueError, match="written by another run"):
        Trainer(small_config(tmp_path / "b", "expander_model=null", "resume=true"))


def test_a_run_killed_at_any_moment_leaves_only_complete_checkpoints(tmp_path):
    """SIGKILL a real training process while it writes a checkpoint every iteration, then resume from what is left."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "train", "--config", "configs/quickstart.yaml", f"output_dir={run}",
               "iterations=50", "checkpoint_every=1", "keep_checkpoints=3", "images_per_prompt=2",
               "num_inference_steps=2", "expander_model=null", "eval_every=0", "resolution=32",
               "validation_images_per_prompt=1"]  # fmt: skip
    repository = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(command, cwd=repository, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("step_00000[3-9]")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    steps = checkpoint_module.step_folders(run / "checkpoints")
    assert steps, "the run wrote checkpoints before it was killed"
    for _, folder in steps:
        read_checkpoint(folder)  # each one complete: manifest, sizes and hashes agree

    resumed = Trainer(small_config(tmp_path, "expander_model=null", "resume=true", "iterations=50",
                                   "checkpoint_every=1", "keep_checkpoints=3", "images_per_prompt=2",
                                   "num_inference_steps=2", "resolution=32"))  # fmt: skip
    assert resumed.iteration == steps[0][0]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == resumed.iteration
    assert not list((run / "checkpoints").glob(".step_*")), "leftovers of the killed write are removed"
