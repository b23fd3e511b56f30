"""The RL core as the methods define it: DDIM steps at per-sample timesteps, PPO over minibatches and inner
epochs, each identifier's front weighed alike, and the ddpo and dpok modes end to end."""

import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler

from train.config import load_config
from train.parrot import Trainer, lora_parameters, selection_weights
from train.sampling import ddim_step_mean


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def config(tmp_path, *overrides):
    return load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", "iterations=2", "images_per_prompt=4", "num_inference_steps=4",
        "eval_every=0", "eval_images_per_prompt=1", "validation_images_per_prompt=1", "expander_model=null", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [{"prediction_type": "epsilon"}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"},
     {"prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.5}, {"set_alpha_to_one": True}],
)  # fmt: skip
def test_the_batched_ddim_step_is_diffusers_step_at_each_samples_timestep(settings):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              **{"clip_sample": False, "set_alpha_to_one": False, **settings})  # fmt: skip
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = scheduler.timesteps[torch.tensor([0, 3, 7, 9])]  # the last one steps to the final alpha
    mean, std = ddim_step_mean(scheduler, output, timesteps, sample, eta=0.8)
    for i, t in enumerate(timesteps):
        zero_noise = torch.zeros_like(sample[i : i + 1])
        expected = scheduler.step(output[i : i + 1], t, sample[i : i + 1], eta=0.8, variance_noise=zero_noise).prev_sample
        torch.testing.assert_close(mean[i : i + 1], expected, rtol=1e-6, atol=1e-6)
        prev = t - 100
        variance = scheduler._get_variance(t, prev)
        torch.testing.assert_close(std[i], 0.8 * variance.sqrt(), rtol=1e-6, atol=0)


def test_each_identifiers_front_weighs_one_kth_whatever_its_size():
    selected = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)  # fronts of 1, 3 and 4 of 4
    weights = selection_weights(selected, groups=3)
    assert weights[~selected].eq(0).all()
    sums = weights.view(3, 4).sum(dim=1)
    torch.testing.assert_close(sums, torch.full((3,), 1 / 3))
    assert weights[0] == pytest.approx(1 / 3) and weights[4] == pytest.approx(1 / 9) and weights[8] == pytest.approx(1 / 12)
    torch.testing.assert_close(selection_weights(torch.tensor([1, 1, 0, 1], dtype=torch.bool), 1), torch.tensor(
        [1 / 3, 1 / 3, 0, 1 / 3]))  # fmt: skip


def snapshot(trainer):
    return ({name: value.detach().clone() for name, value in lora_parameters(trainer.pipe.unet).items()},
            trainer.rng.getstate(), copy.deepcopy({k: v.state_dict() for k, v in trainer.optimizers.items()}))  # fmt: skip


def restore(trainer, state):
    weights, rng, optimizers = state
    with torch.no_grad():
        for name, parameter in lora_parameters(trainer.pipe.unet).items():
            parameter.copy_(weights[name])
    trainer.rng.setstate(rng)
    for name, optimizer in trainer.optimizers.items():
        optimizer.load_state_dict(optimizers[name])


def test_ppo_takes_a_step_per_minibatch_and_clipping_bounds_the_later_ones(tmp_path):
    trainer = Trainer(config(tmp_path, "mode=ddpo", "rewards=[colorfulness]", "train_batch_size=2",
                             "gradient_accumulation_steps=1", "num_inner_epochs=2", "timestep_fraction=0.5",
                             "advantage=batch", "learning_rate=0.01"))  # fmt: skip
    trajectories, images = trainer.sample(["a red fox"])
    selection = trainer.select_global("a red fox", images.std(dim=(1, 2, 3))[:, None])
    start = snapshot(trainer)

    stats = trainer.t2i_update(trajectories, selection)
    assert stats["optimizer_steps"] == 4, "2 minibatches of 2 samples, one step each, 2 epochs"
    first, *later = stats["ratio_deviation"]
    assert first < 1e-5, "the first minibatch is scored at the sampling parameters: ratio 1"
    assert min(later) > 1e-3, "after a step the recomputed log-probs leave the sampling ones"
    unclipped = {name: value.detach().clone() for name, value in lora_parameters(trainer.pipe.unet).items()}

    restore(trainer, start)
    trainer.config.clip_range = 1e-4
    clipped_stats = trainer.t2i_update(trajectories, selection)
    assert clipped_stats["ratio_deviation"][0] == first, "the same first minibatch"
    assert clipped_stats["clipped_fraction"] > 0.5
    after = lora_parameters(trainer.pipe.unet)
    assert any(not torch.equal(after[name], unclipped[name]) for name in after), "clipping changes the update"


def test_timestep_subsets_are_drawn_per_sample(tmp_path, monkeypatch):
    trainer = Trainer(config(tmp_path, "mode=ddpo", "rewards=[colorfulness]", "timestep_fraction=0.5",
                             "num_inference_steps=8", "train_batch_size=4"))  # fmt: skip
    trajectories, images = trainer.sample(["a red fox"])
    selection = trainer.select_global("a red fox", images.std(dim=(1, 2, 3))[:, None])
    seen = []
    policy_gradient = trainer._policy_gradient

    def recording(batch, advantages, scale, steps):
        seen.append(steps)
        return policy_gradient(batch, advantages, scale, steps)

    monkeypatch.setattr(trainer, "_policy_gradient", recording)
    trainer.t2i_update(trajectories, selection)
    steps = torch.stack(seen, dim=1)  # [samples, positions]
    assert steps.shape == (4, 4), "half of the 8 steps, for each of the 4 samples"
    assert all(len(set(row.tolist())) == 4 for row in steps), "each sample trains on 4 distinct steps"
    assert len({tuple(sorted(row.tolist())) for row in steps}) > 1, "the subsets differ between samples"


@pytest.mark.parametrize(("mode", "overrides"), [
    ("ddpo", ["advantage=per_prompt", "clip_range=1.0e-4", "train_batch_size=2", "gradient_accumulation_steps=1"]),
    ("dpok", ["advantage=batch", "kl_beta=0.1", "reward_scale=10.0", "train_batch_size=4"]),
])  # fmt: skip
def test_weighted_sum_modes_train_and_log_their_optimiser_steps(tmp_path, mode, overrides):
    run = config(tmp_path, f"mode={mode}", "rewards=[jpeg_compressibility, colorfulness]", "reward_weights=[0.5, 0.5]",
                 "eval_expansion_guidance_scale=0.0", *overrides)  # fmt: skip
    Trainer(run).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["optimizer_steps"] for line in lines] == [2 if mode == "ddpo" else 1] * 2
    assert all(line["front_fraction"] == 1.0 for line in lines), "every finite sample trains"
    if mode == "dpok":
        assert lines[0]["kl"] == 0.0 and lines[1]["kl"] > 0, "the KL grows once the LoRA moves"
    config_file = json.loads((tmp_path / "run" / "bundle" / "parrot_config.json").read_text())
    assert config_file["method"] == mode and config_file["reward_identifiers"] == []


def test_paper_mode_weighs_each_front_sample_by_its_own_raw_reward(tmp_path, monkeypatch):
    trainer = Trainer(config(tmp_path, "advantage=raw", "train_batch_size=8"))  # parrot mode, two identifiers
    prompt = "a red fox"
    trajectories, _ = trainer.sample(trainer.branch_texts(prompt, prompt))
    rewards = torch.tensor([[1.0, 4.0], [2.0, 3.0], [0.5, 0.5], [3.0, 1.0],  # <reward 1>'s group: one dominated row
                            [2.0, 2.0], [1.0, 1.0], [0.0, 5.0], [1.5, 1.5]])  # <reward 2>'s group  # fmt: skip
    selection = trainer.select_global(prompt, rewards)
    front = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    assert torch.equal(selection.front, front)
    expected = torch.where(front, torch.cat([rewards[:4, 0], rewards[4:, 1]]), torch.tensor(0.0))
    assert torch.equal(selection.advantages[0], expected), "the raw reward of the sample's own identifier"

    def gradients(selection):
        grads = {}
        monkeypatch.setattr(trainer, "_optimizer_step", lambda name: grads.update(
            {n: p.grad.clone() for n, p in trainer.pipe.unet.named_parameters() if p.grad is not None}))  # fmt: skip
        trainer.rng.seed(0)
        trainer.t2i_update(trajectories, selection)
        return grads

    once = gradients(selection)
    twice = gradients(trainer.select_global(prompt, rewards * 2))
    assert any(g.abs().max() > 0 for g in once.values())
    for name in once:  # no baseline, no normalisation: the gradient scales with the rewards
        torch.testing.assert_close(twice[name], 2 * once[name], rtol=1e-4, atol=1e-9)


def test_evaluation_samples_with_the_trained_ddim_sampler_whatever_the_repository_ships(tmp_path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from parrot_pipeline.tiny import tiny_pipeline_components

    components = tiny_pipeline_components()
    components["scheduler"] = PNDMScheduler.from_config(components["scheduler"].config)  # as SD 1.5 ships
    StableDiffusionPipeline(**components).save_pretrained(tmp_path / "pndm-model")
    trainer = Trainer(config(tmp_path, f"pretrained_model={tmp_path / 'pndm-model'}", "eval_images_per_prompt=2"))
    images, _ = trainer.generate(["a red fox"], trained=False, seed=3)

    reference = StableDiffusionPipeline.from_pretrained(tmp_path / "pndm-model")
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(["a red fox"] * 2, num_inference_steps=4, guidance_scale=5.0, height=64, width=64, eta=0.0,
                         generator=[torch.Generator().manual_seed(3 + i) for i in range(2)], output_type="pt").images
    assert isinstance(trainer.pipe.scheduler, DDIMScheduler)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_evaluation_can_carry_a_subset_of_the_identifiers(tmp_path):
    trainer = Trainer(config(tmp_path, "eval_images_per_prompt=1"))  # parrot mode, two identifiers, no expander
    _, all_texts = trainer.generate(["a red fox"], trained=True, seed=0)
    _, second_only = trainer.generate(["a red fox"], trained=True, seed=0, identifiers=[1])
    assert all_texts == ["<reward 1>, <reward 2>, a red fox"] and second_only == ["<reward 2>, a red fox"]
