"""A run's bundle goes to the Hub with its model card; a failed upload keeps the results and names the bundle."""

import json
import logging

import pytest
import yaml

from train.__main__ import main
from train.parrot import Trainer

from .test_train_loop import small_config, small_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_run_pushes_its_bundle_with_settings_evaluation_and_gallery_in_the_card(tmp_path, hub):
    results = Trainer(small_config(tmp_path, "iterations=1", "push_to_hub=me/parrot-run", "hub_private=true")).run()
    assert results["hub"]["url"].startswith(f"{hub.endpoint}/me/parrot-run/commit/")
    repo = hub.repos["me/parrot-run"]
    assert repo["private"] is True
    bundle = tmp_path / "run" / "bundle"
    assert set(repo["files"]) == {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    card = repo["files"]["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["widget"][0]["output"]["url"] == "samples/eval_trained.png"
    assert repo["files"]["samples/eval_trained.png"] == (tmp_path / "run" / "samples" / "eval_trained.png").read_bytes()
    assert "| `lora_rank` | `8` |" in card and "| `mode` | `parrot` |" in card
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    hypervolume = f"{evaluation['trained']['hypervolume']:.4f}"
    assert "| trained (iteration 1, the bundle) |" in card and hypervolume in card
    assert 'load_parrot_weights("me/parrot-run")' in card and "LoraLoaderModelOnly" in card
    logged = (tmp_path / "run" / "metrics.jsonl").read_text() + json.dumps(results)
    assert "hf_secret_token" not in card + logged


def test_a_failed_upload_is_retried_then_reported_with_the_local_bundle(tmp_path, hub, caplog):
    hub.failures["/api/models/me/parrot-run/commit/main"] = [503] * 100  # the Hub is down
    arguments = ["--config", "configs/quickstart.yaml", *small_overrides(tmp_path), "iterations=1",
                 "push_to_hub=me/parrot-run"]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        status = main(arguments)
    assert status == 1
    bundle = tmp_path / "run" / "bundle"
    assert (bundle / "pytorch_lora_weights.safetensors").is_file()
    assert f"The bundle is safe at {bundle}" in caplog.text and f"hf upload me/parrot-run {bundle}" in caplog.text
    assert [path for _, path, _ in hub.requests].count("/api/repos/create") == 3, "three attempts"
