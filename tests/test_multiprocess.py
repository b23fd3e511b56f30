"""Two CPU processes under ``accelerate launch`` (torchrun, gloo): identical weights, a global Pareto front, one
writer. (accelerate's ``--cpu`` flag starts a single process unless MPI is installed; ``--multi_gpu`` starts
torchrun, and the config's ``device: cpu`` makes the processes use gloo.)"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.pareto import non_dominated_mask

from .helpers import two_process_launch

REPOSITORY = Path(__file__).resolve().parents[1]
SETTINGS = ["iterations=2", "images_per_prompt=4", "num_inference_steps=2", "resolution=32", "eval_every=0",
            "expander_sft_epochs=1", "expander_max_new_tokens=6", "checkpoint_every=1", "train_batch_size=1",
            "gradient_accumulation_steps=1", "validate_every=1", "validation_images_per_prompt=1",
            "collapse_action=rollback", "collapse_margin=0.0"]  # fmt: skip


def launch(output: Path, *overrides: str, env: dict | None = None, timeout: float = 600):
    command = two_process_launch("tests/multiprocess_run.py", str(output), "device=cpu", *SETTINGS, *overrides)
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY), **(env or {})})  # fmt: skip


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("two")
    # An empty model cache: both processes need the tiny models, which only rank 0 can write.
    result = launch(output, env={"PARROT_PIPELINE_CACHE": str(tmp_path_factory.mktemp("empty-cache"))})
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def test_every_process_ends_with_the_same_weights(two_process_run):
    first, second = (load_file(two_process_run / f"weights_rank{r}.safetensors") for r in (0, 1))
    assert first.keys() == second.keys() and any(k.startswith("expander/") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    initial = load_file(next((two_process_run / "run" / "checkpoints").glob("step_*")) / "state.safetensors")
    assert initial, "the run wrote checkpoints"


def test_the_main_process_expands_and_fine_tunes_for_all(two_process_run):
    """Rank 1 perturbs its own supervised stage and samples with another seed (tests/multiprocess_run.py): the
    texts and weights still agree, because both come from rank 0."""
    texts = [(two_process_run / f"texts_rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(texts[0]) == 2 and texts[0] == texts[1]


def test_the_front_is_selected_over_the_gathered_batch(two_process_run):
    recorded = [load_file(two_process_run / f"recorded_rank{r}.safetensors") for r in (0, 1)]
    for iteration in range(2):
        rewards = recorded[0][f"{iteration}/rewards"]
        assert torch.equal(rewards, recorded[1][f"{iteration}/rewards"]), "every process sees the global batch"
        local = [recorded[r][f"{iteration}/local_rewards"] for r in (0, 1)]
        groups, per_process = 2, 2  # two identifiers; images_per_prompt 4 split over two processes
        expected_rows = torch.cat([torch.cat([local[r][g * per_process : (g + 1) * per_process] for r in (0, 1)])
                                   for g in range(groups)])  # fmt: skip
        assert torch.equal(rewards, expected_rows), "group-major order of both processes' samples"
        selected = recorded[0][f"{iteration}/front"].bool()
        single_process_front = torch.cat([non_dominated_mask(rewards[g * 4 : (g + 1) * 4]) for g in range(groups)])
        assert torch.equal(selected, single_process_front)
        for r in (0, 1):  # each process back-propagates its own rows of the front
            mine = torch.cat([selected[g * 4 + r * per_process : g * 4 + (r + 1) * per_process] for g in range(groups)])
            assert torch.equal(recorded[r][f"{iteration}/local_selected"].bool(), mine)
        # the weights of each identifier's front, spread over both processes, sum to 1/K whatever its size
        weights = recorded[0][f"{iteration}/weights"]  # [process, group·local sample]
        assert torch.equal(weights, recorded[1][f"{iteration}/weights"])
        for g in range(groups):
            group = weights[:, g * per_process : (g + 1) * per_process]
            assert group.sum().item() == pytest.approx(1 / groups)
            assert torch.allclose(group[group > 0], group[group > 0][0]), "equal within a front"


def test_every_process_takes_the_main_process_validation_and_its_decisions(two_process_run):
    first, second = (json.loads((two_process_run / f"validation_rank{r}.json").read_text()) for r in (0, 1))
    assert [record["iteration"] for record in first["validations"]] == [0, 1, 2]
    assert first == second  # the same scores, the same selected iterate, the same rollbacks and learning rates


def test_only_the_main_process_writes(two_process_run):
    lines = (two_process_run / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1]


def test_a_batch_that_does_not_divide_across_processes_is_refused(tmp_path):
    result = launch(tmp_path, "images_per_prompt=3", "expander_model=null")
    assert result.returncode != 0
    assert "config `images_per_prompt` = 3 does not divide across 2 processes" in result.stderr


def test_a_dead_process_stops_the_others_with_a_clear_message(tmp_path):
    result = launch(tmp_path, "expander_model=null", "collective_timeout=60", env={"PARROT_TEST_DIE_AT": "1"},
                    timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert not (tmp_path / "weights_rank0.safetensors").exists(), "the surviving process did not finish alone"
    assert "gathering rewards failed: another training process stopped" in result.stderr, result.stderr[-3000:]
    assert "Restart with resume=true" in result.stderr
