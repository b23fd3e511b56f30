"""The training loop on the tiny model: what one iteration changes, KL, the supervised stage, outputs, faults."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from parrot_pipeline.expansion import ExpanderConfig
from parrot_pipeline.tiny import tiny_expander
from train.config import load_config
from train.parrot import Trainer, lora_parameters
from train.sampling import guided_noise, recompute_log_prob
from train.sft import load_pairs, pair_loss, supervised_finetune

import tests.reward_probes as probes

from .helpers import load, seeded


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test's Trainer builds its own Accelerator (accelerate keeps one state per process otherwise)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def small_overrides(tmp_path) -> list[str]:
    """The quickstart preset shrunk to seconds, writing into ``tmp_path / "run"``."""
    return [f"output_dir={tmp_path / 'run'}", "overwrite=false", "iterations=2", "images_per_prompt=4",
            "num_inference_steps=3", "expander_sft_epochs=1", "eval_every=0", "eval_images_per_prompt=1",
            "validation_images_per_prompt=1", "expander_max_new_tokens=8"]  # fmt: skip


def small_config(tmp_path, *overrides):
    return load_config("configs/quickstart.yaml", [*small_overrides(tmp_path), *overrides])


def nan_for_odd_rows(images, prompts, metadata):
    values = images.mean(dim=(1, 2, 3))
    values[1::2] = math.nan
    return values


def always_nan(images, prompts, metadata):
    return torch.full((len(images),), math.nan)


def recorded_gradients(trainer, trajectories, selection, monkeypatch):
    grads = {}

    def record(name):
        grads.update({n: p.grad.clone() for n, p in trainer.pipe.unet.named_parameters() if p.grad is not None})

    monkeypatch.setattr(trainer, "_optimizer_step", record)
    trainer.rng.seed(0)  # the same minibatch order and timestep subsets each time
    trainer.t2i_update(trajectories, selection)
    return grads


def test_one_iteration_trains_only_lora_and_only_from_the_front(tmp_path, monkeypatch):
    trainer = Trainer(small_config(tmp_path, "expander_model=null", "timestep_fraction=1.0"))
    prompt = "a cat in the snow"
    trajectories, images = trainer.sample(trainer.branch_texts(prompt, prompt))
    rewards = torch.stack([-images.mean(dim=(1, 2, 3)), images.std(dim=(1, 2, 3))], dim=1)
    selection = trainer.select_global(prompt, rewards)
    selected = selection.front
    assert 0 < selected.sum() < len(selected), "the test needs samples on both sides of the front"

    grads = recorded_gradients(trainer, trajectories, selection, monkeypatch)
    assert grads and all("lora" in name for name in grads), "only LoRA parameters receive gradients"
    assert any(g.abs().max() > 0 for g in grads.values())

    outside = (~selected).nonzero()[0, 0]
    perturbed = trajectories.select(torch.arange(len(selected)))
    perturbed.latents = perturbed.latents.clone()
    perturbed.latents[outside] = torch.randn_like(perturbed.latents[outside]) * 10
    perturbed.log_probs = perturbed.log_probs.clone()
    perturbed.log_probs[outside] = 123.0
    again = recorded_gradients(trainer, perturbed, selection, monkeypatch)
    assert all(torch.equal(grads[name], again[name]) for name in grads), "a sample outside P has no effect"

    inside = selected.nonzero()[0, 0]
    perturbed.latents[inside] = perturbed.latents[inside] + 0.5
    moved = recorded_gradients(trainer, perturbed, selection, monkeypatch)
    assert any(not torch.equal(grads[name], moved[name]) for name in grads), "a sample in P does change it"


def test_iteration_updates_lora_weights_and_nothing_else(tmp_path):
    trainer = Trainer(small_config(tmp_path, "expander_model=null"))
    before = {name: p.detach().clone() for name, p in trainer.pipe.unet.named_parameters()}
    record = trainer.train_iteration()
    changed = {name for name, p in trainer.pipe.unet.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora" in name for name in changed)
    assert 0 < record["front_fraction"] <= 1 and record["nonfinite_samples"] == 0


def test_the_kl_is_the_distance_to_the_unet_without_its_lora(tmp_path):
    """DPOK's KL against a separately loaded UNet that never had a LoRA: a reference that kept the adapter on
    would give 0, one that lost the guidance or used other timesteps would give another number."""
    trainer = Trainer(small_config(tmp_path, "mode=dpok", "rewards=[jpeg_compressibility]", "kl_beta=0.1",
                                   "expander_model=null", "eval_expansion_guidance_scale=0.0"))  # fmt: skip
    trajectories, _ = trainer.sample(["a cat", "a dog"])
    trajectories = trajectories.select(torch.tensor([0, 4]))  # one of each prompt
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in lora_parameters(trainer.pipe.unet).items():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    steps = torch.tensor([0, 2])
    with torch.no_grad():
        _, noise = recompute_log_prob(trainer.pipe.unet, trainer.scheduler, trajectories, steps, guidance_scale=5.0, eta=1.0)
        kl = trainer.kl_to_pretrained(trajectories, steps, noise)
        base = StableDiffusionPipeline.from_pretrained(trainer.base_model).unet
        reference = torch.cat([
            guided_noise(base, trainer.scheduler, trajectories.latents[i : i + 1, step], trajectories.timesteps[step],
                         trajectories.prompt_embeds[i : i + 1], trajectories.negative_embeds[i : i + 1], 5.0)
            for i, step in enumerate(steps.tolist())
        ])  # fmt: skip
    expected = ((noise - reference) ** 2).mean(dim=(1, 2, 3))
    assert (expected > 0).all()
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-8)


def test_supervised_stage_lowers_the_expander_loss():
    model, tokenizer = tiny_expander()
    pairs = load_pairs("train/data/quickstart_expansions.jsonl")[:16]
    config = ExpanderConfig()
    with torch.no_grad():
        before = pair_loss(model, tokenizer, pairs, config).item()
    losses = supervised_finetune(model, tokenizer, pairs, config, epochs=3, learning_rate=3e-3, batch_size=8, seed=0)
    with torch.no_grad():
        after = pair_loss(model, tokenizer, pairs, config).item()
    assert after < before * 0.8 and losses[-1] < losses[0]


def test_run_writes_everything_and_the_bundle_round_trips(tmp_path, capsys):
    config = small_config(tmp_path)
    results = Trainer(config).run()
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1]
    for key in ("reward/jpeg_compressibility", "reward/colorfulness", "front_fraction", "loss/t2i", "loss/expander",
                "lr/unet", "lr/expander", "seconds", "expanded_prompt"):  # fmt: skip
        assert key in lines[0]
    assert (run / "plots" / "rewards.png").stat().st_size > 0 and (run / "plots" / "pareto.png").stat().st_size > 0
    assert list((run / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert (run / "samples" / "eval_trained.png").is_file()
    assert {"base", "trained", "selection"} <= set(results) and "hypervolume gain" in capsys.readouterr().out

    bundle = run / "bundle"
    saved = json.loads((bundle / "parrot_config.json").read_text())
    assert saved["method"] == "parrot" and saved["reward_names"] == ["jpeg_compressibility", "colorfulness"]
    ours = load(saved["base_model"])
    ours.load_parrot_weights(bundle)
    stock = StableDiffusionPipeline.from_pretrained(saved["base_model"])
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(bundle)
    def kwargs():
        return {"num_inference_steps": 3, "guidance_scale": 7.5, "generator": seeded(), "output_type": "np"}

    np.testing.assert_allclose(
        ours("a cat", expansion_guidance_scale=0.0, **kwargs()).images, stock("a cat", **kwargs()).images, atol=1e-6
    )
    assert ours("a cat", **kwargs()).expanded_prompts[0].startswith("<reward 1>, <reward 2>, ")


def test_non_finite_rewards_leave_the_front_and_are_counted(tmp_path):
    trainer = Trainer(small_config(tmp_path, "expander_model=null",
                                   "rewards=[colorfulness, tests.test_train_loop:nan_for_odd_rows]"))  # fmt: skip
    record = trainer.train_iteration()
    rewards, selected = trainer.reward_batches["last"]
    assert record["nonfinite_samples"] == len(rewards) // 2
    assert not selected[1::2].any() and selected[0::2].any()


def test_a_batch_with_no_finite_reward_skips_its_update(tmp_path, caplog):
    trainer = Trainer(small_config(tmp_path, "expander_model=null",
                                   "rewards=[colorfulness, tests.test_train_loop:always_nan]"))  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.pipe.unet.named_parameters()}
    record = trainer.train_iteration()
    assert record["skipped"] and record["front_fraction"] == 0
    assert all(torch.equal(p, before[name]) for name, p in trainer.pipe.unet.named_parameters())
    assert "skipped" in caplog.text


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    import train.parrot as loop

    trainer = Trainer(small_config(tmp_path, "expander_model=null"))
    monkeypatch.setattr(loop, "policy_loss", lambda log_prob, *rest, **options: log_prob * math.inf)
    before = {name: p.detach().clone() for name, p in trainer.pipe.unet.named_parameters()}
    record = trainer.train_iteration()
    assert record["skipped"] is True
    assert all(torch.equal(p, before[name]) for name, p in trainer.pipe.unet.named_parameters())


def test_existing_output_dir_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("results of another run")
    monkeypatch.setattr("train.run.ParrotPipeline.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        Trainer(small_config(tmp_path))
    assert (tmp_path / "run" / "keep.txt").read_text() == "results of another run"


def test_expander_trains_by_reinforce_and_the_ablation_switches(tmp_path):
    trainer = Trainer(small_config(tmp_path, "train_unet=false"))
    unet_before = {name: p.detach().clone() for name, p in trainer.pipe.unet.named_parameters()}
    expander_before = {name: p.detach().clone() for name, p in trainer.expander.named_parameters()}
    record = trainer.train_iteration()
    assert math.isfinite(record["loss/expander"]) and "loss/t2i" not in record
    changed = {n for n, p in trainer.expander.named_parameters() if not torch.equal(p, expander_before[n])}
    assert changed and all("lora" in name for name in changed), "only the expander's LoRA moves"
    assert all(torch.equal(p, unet_before[n]) for n, p in trainer.pipe.unet.named_parameters()), "T2I frozen"

    frozen = Trainer(small_config(tmp_path / "frozen", "freeze_expander=true"))
    assert "expander" not in frozen.optimizers and "unet" in frozen.optimizers


def test_log_probs_are_float32_when_the_unet_runs_in_bfloat16(tmp_path):
    trainer = Trainer(small_config(tmp_path, "expander_model=null", "mixed_precision=bf16"))
    assert trainer.pipe.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.unet_parameters), "trainable LoRA stays in float32"
    trajectories, _ = trainer.sample(["a cat"])
    assert trajectories.log_probs.dtype == torch.float32 and trajectories.latents.dtype == torch.float32
    record = trainer.train_iteration()
    assert math.isfinite(record["loss/t2i"])


def test_bundle_of_a_run_without_supervised_stage_holds_the_expander_adapter(tmp_path):
    trainer = Trainer(small_config(tmp_path, "expander_sft_data=null", "expander_learning_rate=0.01"))
    trainer.train_iteration()
    bundle = trainer.save_bundle()
    assert (bundle / "expander" / "adapter_config.json").is_file(), "only the adapter: the base is a public model"
    pipe = load(trainer.base_model)
    pipe.load_parrot_weights(bundle)
    ours = pipe.expand_prompts(["a cat", "a castle on a hill"], seed=5)
    from parrot_pipeline.expansion import expand_prompts

    theirs = expand_prompts(trainer.expander, trainer.expander_tokenizer, ["a cat", "a castle on a hill"],
                            trainer.expander_config, seed=5)  # fmt: skip
    assert ours == theirs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_asking_for_cuda_without_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no CUDA device is available"):
        Trainer(small_config(tmp_path, "device=cuda"))
    assert not (tmp_path / "run").exists()


def test_single_reward_dpok_run_writes_its_plots_and_a_bundle_without_identifiers(tmp_path):
    config = small_config(tmp_path, "mode=dpok", "rewards=[jpeg_compressibility]", "kl_beta=0.1",
                          "expander_model=null", "iterations=1")  # fmt: skip
    Trainer(config).run()
    run = tmp_path / "run"
    assert (run / "plots" / "pareto.png").stat().st_size > 0
    saved = json.loads((run / "bundle" / "parrot_config.json").read_text())
    assert (saved["method"], saved["reward_identifiers"], saved["expander"]) == ("dpok", [], None)
    pipe = load(saved["base_model"])
    pipe.load_parrot_weights(run / "bundle")
    assert pipe("a cat", num_inference_steps=1, output_type="latent").expanded_prompts is None


def test_rewards_scored_in_the_worker_thread_equal_scoring_in_line(tmp_path):
    records = {}
    for overlap in (True, False):
        probes.scoring_threads.clear()
        config = small_config(tmp_path / str(overlap), "expander_model=null", "train_batch_size=2",
                              f"reward_worker_overlap={str(overlap).lower()}",
                              "rewards=[jpeg_compressibility, tests.reward_probes:thread_recording_mean]")  # fmt: skip
        records[overlap] = Trainer(config).train_iteration()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        assert len(probes.scoring_threads) == 4 and all(name.startswith("rewards") for name in probes.scoring_threads)
    for record in records.values():
        record.pop("seconds")
    assert records[True] == records[False]
