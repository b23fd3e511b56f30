"""Parrot's central claim, measured: batch-wise Pareto selection against a weighted sum of the same rewards.

For each seed, the quickstart setting is trained twice with the same budget (iterations × images per iteration)
and the same seeds: in ``parrot`` mode (K identifiers × N images, Pareto front, raw per-reward weights of the
selected samples) and in ``ddpo`` mode on the weighted sum of the rewards (K·N images of the original prompt, PPO,
per-prompt advantages). The weights are ``1 / (K · std_k)`` with std_k the base model's spread of reward k on the
held-out images, so every reward counts equally. Both trained models and the base model are scored on the
held-out prompts with fixed seeds; hypervolumes share one normalisation per seed.

    python bench/pareto_vs_weighted.py [--seeds 0 1 2] [--iterations 60] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.pareto import compare_reward_sets  # noqa: E402
from train.parrot import Trainer  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def trained_rewards(overrides: list[str]) -> tuple[Trainer, torch.Tensor, dict]:
    """Train one configuration; returns the trainer, its held-out reward matrix and its training cost."""
    trainer = Trainer(load_config(PRESET, overrides))
    started = time.perf_counter()
    trainer.train_loop()
    cost = {
        "train_seconds": time.perf_counter() - started,
        "backpropagated_fraction": statistics.mean(record["front_fraction"] for record in trainer.history),
    }
    return trainer, trainer.eval_rewards(trained=True), cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="default: the quickstart's")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    preset = load_config(PRESET)
    names, k = preset.rewards, len(preset.rewards)
    iterations = args.iterations or preset.iterations
    per_seed = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            common = [f"seed={seed}", f"iterations={iterations}", "eval_every=0", "overwrite=true"]
            started = time.perf_counter()
            parrot, parrot_rewards, parrot_cost = trained_rewards(
                [*common, "mode=parrot", f"output_dir={scratch}/parrot{seed}"]
            )
            base_rewards = parrot.eval_rewards(trained=False)
            spread = base_rewards.std(dim=0).clamp(min=1e-12)
            weights = (1 / (k * spread)).tolist()
            _, weighted_rewards, weighted_cost = trained_rewards([
                *common, "mode=ddpo", "expander_model=null", f"reward_weights={weights}",
                f"images_per_prompt={k * preset.images_per_prompt}", "advantage=per_prompt", "clip_range=0.0001",
                "eval_expansion_guidance_scale=0.0", f"output_dir={scratch}/weighted{seed}",
            ])  # fmt: skip
            results = compare_reward_sets(
                {"base": base_rewards, "parrot": parrot_rewards, "weighted": weighted_rewards}, names
            )
            results["parrot"]["cost"], results["weighted"]["cost"] = parrot_cost, weighted_cost
            results["seconds"] = time.perf_counter() - started
            per_seed.append(results)
            print(f"seed {seed}: " + ", ".join(f"{m} HV {results[m]['hypervolume']:.4f}" for m in ("base", "parrot", "weighted")))

    print(f"\n{len(args.seeds)} seeds, {iterations} iterations, {k * preset.images_per_prompt} images per iteration")
    header = "| model | " + " | ".join(names) + " | hypervolume |"
    print(header + "\n" + "|---" * (k + 2) + "|")
    summary = {}
    for model in ("base", "parrot", "weighted"):
        cells = []
        for name in [*names, "hypervolume"]:
            values = [r[model]["hypervolume"] if name == "hypervolume" else r[model]["means"][name] for r in per_seed]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4g} ± {sd:.2g}")
            summary.setdefault(model, {})[name] = values
        print(f"| {model} | " + " | ".join(cells) + " |")
    for model in ("parrot", "weighted"):
        fraction = statistics.mean(r[model]["cost"]["backpropagated_fraction"] for r in per_seed)
        seconds = statistics.mean(r[model]["cost"]["train_seconds"] for r in per_seed)
        print(f"{model}: {fraction:.0%} of the samples back-propagated, {seconds:.0f} s of training per seed")
    wins = sum(r["parrot"]["hypervolume"] > r["weighted"]["hypervolume"] for r in per_seed)
    print(f"\nparrot's hypervolume above the weighted sum's in {wins} of {len(per_seed)} seeds")
    if args.json:
        args.json.write_text(json.dumps({"per_seed": per_seed, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
