"""Parrot's central claim, measured: batch-wise Pareto selection against weighted sums of the same rewards.

Every arm trains the quickstart's tiny model on three weight-free rewards that pull against each other (JPEG
compressibility, colourfulness, sharpness) with the same sampling budget, K × N = 3 × 8 = 24 images per
iteration, the same iterations, prompts and seeds, AdamW at the quickstart's learning rate with gradient clipping 1.
The arms and their settings are fixed here, before anything runs:

| arm | what |
|---|---|
| parrot | Parrot as the paper: identifiers, expander, Pareto front per identifier, raw rewards |
| parrot-normalised | the same with batch-normalised advantages (the quickstart's) |
| parrot-no-expansion | Pareto selection and identifiers alone, no expander (isolates the selection) |
| parrot-ppo | added after the first seeds: Parrot on ddpo-equal's update schedule (per-prompt advantages, PPO clip 1e-4,
  minibatches of 8, one optimiser step each), so that only the selection, the identifiers and the expander differ |
| ddpo-equal | weighted sum with PPO (clip 1e-4, per-prompt advantages, 3 optimiser steps per iteration), weights
  1 / (K · std_k) from the base model's held-out spread: every reward counts equally |
| ddpo-skewed-1, ddpo-skewed-2 | the same with weights (0.7, 0.15, 0.15) and (0.15, 0.7, 0.15) over the spreads (the
  paper compared {0.7, 0.1, 0.1, 0.1} with equal weights) |
| dpok-equal | weighted sum with DPOK's −α·A·clamp(ratio) + β·KL (α 1000, β 0.1, clamp 1e-4, batch-normalised
  advantages), equal weights |

For each seed the base model is scored once on the held-out prompts (8 prompts × 4 images, fixed seeds, DDIM eta 0),
then every arm is trained and scored the same way. Per arm and seed: each reward's change against the base, how many
rewards ended below the base ("collapsed"), the hypervolume of the reward vectors (each reward rescaled to [0, 1] over
the base and every arm of that seed, so the arms of a seed share one scale), the share of samples back-propagated
and the training seconds. The Parrot arms with identifiers are also scored with each single identifier: whether
reward k rises when ĉ carries only ``<reward k>`` rather than all of them.

    python bench/pareto_vs_weighted.py --seeds 0 1 --json shard-a.json          # a shard: some seeds, some arms
    python bench/pareto_vs_weighted.py --seeds 2 3 4 --arms parrot ddpo-equal --json shard-b.json
    python bench/pareto_vs_weighted.py --merge shard-a.json shard-b.json         # the tables over every shard

A shard holds whole seeds: the base model's and each arm's held-out reward matrices. Merged shards give one table per
arm, paired by seed; a seed run in two shards (other arms) is one seed, every arm rescaled on its shared scale. The exit code is 0 whatever the outcome: this is a report, not a test.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout

from train.config import load_config  # noqa: E402
from train.pareto import compare_reward_sets  # noqa: E402
from train.parrot import Trainer  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
REWARDS = ["jpeg_compressibility", "colorfulness", "sharpness"]
K, N = len(REWARDS), 8
COMMON = [f"rewards={REWARDS}", "eval_every=0", "validate_every=0", "overwrite=true", "max_grad_norm=1.0"]
WEIGHTED = ["expander_model=null", f"images_per_prompt={K * N}", "eval_expansion_guidance_scale=0.0"]
ARMS = {
    "parrot": [f"images_per_prompt={N}", "advantage=raw"],
    "parrot-normalised": [f"images_per_prompt={N}", "advantage=batch"],
    "parrot-no-expansion": [f"images_per_prompt={N}", "advantage=batch", "expander_model=null"],
    "parrot-ppo": [f"images_per_prompt={N}", "advantage=per_prompt", "clip_range=1.0e-4", "train_batch_size=8",
                   "gradient_accumulation_steps=1"],
    "ddpo-equal": ["mode=ddpo", *WEIGHTED, "advantage=per_prompt", "clip_range=1.0e-4", "train_batch_size=8",
                   "gradient_accumulation_steps=1"],
    "ddpo-skewed-1": ["mode=ddpo", *WEIGHTED, "advantage=per_prompt", "clip_range=1.0e-4", "train_batch_size=8",
                      "gradient_accumulation_steps=1"],
    "ddpo-skewed-2": ["mode=ddpo", *WEIGHTED, "advantage=per_prompt", "clip_range=1.0e-4", "train_batch_size=8",
                      "gradient_accumulation_steps=1"],
    "dpok-equal": ["mode=dpok", *WEIGHTED, "advantage=batch", "reward_scale=1000.0", "kl_beta=0.1",
                   "clip_range=1.0e-4", "train_batch_size=8"],
}  # fmt: skip
SHARES = {"ddpo-equal": [1 / 3] * 3, "ddpo-skewed-1": [0.7, 0.15, 0.15], "ddpo-skewed-2": [0.15, 0.7, 0.15],
          "dpok-equal": [1 / 3] * 3}  # fmt: skip


def train_arm(arm: str, seed: int, iterations: int, scratch: Path, spread: torch.Tensor) -> dict:
    """Train one arm; returns its held-out reward matrix (and per-identifier ones) and its cost."""
    overrides = [*COMMON, *ARMS[arm], f"seed={seed}", f"iterations={iterations}", f"output_dir={scratch / arm}"]
    if arm in SHARES:
        overrides.append(f"reward_weights={[share / s for share, s in zip(SHARES[arm], spread.tolist())]}")
    trainer = Trainer(load_config(PRESET, overrides))
    started = time.perf_counter()
    trainer.train_loop()
    result = {
        "train_seconds": time.perf_counter() - started,
        "backpropagated_fraction": statistics.mean(record["front_fraction"] for record in trainer.history),
        "rewards": trainer.eval_rewards(trained=True),
    }
    if trainer.config.mode == "parrot":
        result["single_identifier"] = [trainer.eval_rewards(trained=True, identifiers=[k]) for k in range(K)]
    trainer.accelerator.end_training()
    from accelerate.state import AcceleratorState  # each arm's Trainer builds its own Accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def run_seed(seed: int, arms: list[str], iterations: int, scratch: Path) -> dict:
    """The base model and each arm on one seed: their held-out reward matrices and each arm's cost."""
    base_trainer = Trainer(load_config(PRESET, [*COMMON, *WEIGHTED, "mode=ddpo", f"seed={seed}",
                                                f"output_dir={scratch / 'base'}"]))  # fmt: skip
    base = base_trainer.eval_rewards(trained=False)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    spread = base.std(dim=0).clamp(min=1e-12)
    trained = {arm: train_arm(arm, seed, iterations, scratch / f"seed{seed}", spread) for arm in arms}
    raw = {"seed": seed, "base_rewards": base.tolist(), "arms": {}}
    for arm, result in trained.items():
        raw["arms"][arm] = {**result, "rewards": result["rewards"].tolist()}
        if "single_identifier" in result:
            raw["arms"][arm]["single_identifier"] = [matrix.tolist() for matrix in result["single_identifier"]]
    return raw


def summarise(raw: dict) -> dict:
    """One seed's figures, every arm on the seed's shared scale (the base and all its arms)."""
    base = torch.tensor(raw["base_rewards"])
    matrices = {arm: torch.tensor(entry["rewards"]) for arm, entry in raw["arms"].items()}
    shared = compare_reward_sets({"base": base, **matrices}, REWARDS)
    record = {"seed": raw["seed"], "base": shared["base"], "arms": {}}
    for arm, entry in raw["arms"].items():
        means = shared[arm]["means"]
        change = {name: means[name] - shared["base"]["means"][name] for name in REWARDS}
        summary = {
            "means": means, "change": change, "collapsed": sum(value < 0 for value in change.values()),
            "hypervolume": shared[arm]["hypervolume"], "train_seconds": entry["train_seconds"],
            "backpropagated_fraction": entry["backpropagated_fraction"],
        }  # fmt: skip
        if "single_identifier" in entry:
            all_ids = matrices[arm].nanmean(dim=0)
            alone = [torch.tensor(m).nanmean(dim=0)[k].item() for k, m in enumerate(entry["single_identifier"])]
            summary["single_identifier"] = {name: {"alone": alone[k], "all": all_ids[k].item()}
                                            for k, name in enumerate(REWARDS)}  # fmt: skip
        record["arms"][arm] = summary
    return record


def merge(shards: list[dict]) -> list[dict]:
    """The seeds of every shard; a seed run in several shards (other arms) is one seed, all its arms on one scale.
    Shards written before the script kept the reward matrices hold their figures already summarised."""
    by_seed: dict[int, dict] = {}
    for record in (record for shard in shards for record in shard["seeds"]):
        if "base_rewards" not in record:  # summarised already: stands alone
            if record["seed"] in by_seed:
                raise SystemExit(f"seed {record['seed']} is in two shards, one without reward matrices: rerun it")
            by_seed[record["seed"]] = record
            continue
        known = by_seed.setdefault(record["seed"], {"seed": record["seed"], "base_rewards": record["base_rewards"],
                                                    "arms": {}})  # fmt: skip
        if "base_rewards" not in known or known["base_rewards"] != record["base_rewards"]:
            raise SystemExit(f"seed {record['seed']}: the shards disagree on the base model's rewards")
        known["arms"].update(record["arms"])
    return [record if "base_rewards" not in record else summarise(record) for _, record in sorted(by_seed.items())]


def spread_of(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.4g}"


def report(seeds: list[dict]) -> None:
    arms = [arm for arm in ARMS if all(arm in record["arms"] for record in seeds)]
    print(f"{len(seeds)} seeds ({', '.join(str(r['seed']) for r in seeds)}), {K * N} images per iteration\n")
    print("| arm | " + " | ".join(f"Δ {name}" for name in REWARDS) + " | collapsed | hypervolume | back-propagated | s |")
    print("|---" * (len(REWARDS) + 5) + "|")
    print("| base | " + " | ".join("0" for _ in REWARDS) + f" | – | {spread_of([r['base']['hypervolume'] for r in seeds])} | – | – |")
    for arm in arms:
        entries = [record["arms"][arm] for record in seeds]
        cells = [spread_of([e["change"][name] for e in entries]) for name in REWARDS]
        collapsed = sum(e["collapsed"] for e in entries)
        print(f"| {arm} | " + " | ".join(cells) + f" | {collapsed} in {len(entries)} runs | "
              f"{spread_of([e['hypervolume'] for e in entries])} | "
              f"{statistics.mean(e['backpropagated_fraction'] for e in entries):.0%} | "
              f"{statistics.mean(e['train_seconds'] for e in entries):.0f} |")  # fmt: skip
    for arm in [a for a in arms if a.startswith("parrot")]:
        others = [a for a in arms if not a.startswith("parrot")]
        for other in others:
            wins = sum(r["arms"][arm]["hypervolume"] > r["arms"][other]["hypervolume"] for r in seeds)
            print(f"{arm} above {other} in hypervolume: {wins} of {len(seeds)} seeds")
    print("\nper seed, hypervolume: " + "; ".join(
        f"seed {r['seed']}: base {r['base']['hypervolume']:.3f}, "
        + ", ".join(f"{arm} {r['arms'][arm]['hypervolume']:.3f}" for arm in arms) for r in seeds))  # fmt: skip
    for arm in [a for a in arms if "single_identifier" in seeds[0]["arms"][a]]:
        rises = {name: sum(r["arms"][arm]["single_identifier"][name]["alone"] > r["arms"][arm]["single_identifier"][name]["all"]
                           for r in seeds) for name in REWARDS}  # fmt: skip
        print(f"{arm}: reward k higher with <reward k> alone than with all identifiers in "
              + ", ".join(f"{name} {count}/{len(seeds)}" for name, count in rises.items()) + " seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--iterations", type=int, default=None, help="default: the quickstart's")
    parser.add_argument("--json", type=Path, help="write this shard's figures here (after each seed)")
    parser.add_argument("--merge", type=Path, nargs="+", help="report over these shards instead of training")
    args = parser.parse_args()
    if args.merge:
        return report(merge([json.loads(path.read_text()) for path in args.merge]))
    iterations = args.iterations or load_config(PRESET).iterations
    seeds = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            seeds.append(run_seed(seed, args.arms, iterations, Path(scratch)))
            if args.json:
                args.json.write_text(json.dumps({"iterations": iterations, "seeds": seeds}) + "\n")
            summary = summarise(seeds[-1])
            print(f"seed {seed} done: " + ", ".join(f"{a} HV {e['hypervolume']:.3f}" for a, e in summary["arms"].items()),
                  flush=True)  # fmt: skip
    report([summarise(raw) for raw in seeds])


if __name__ == "__main__":
    main()
