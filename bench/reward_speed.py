"""Reward throughput on CPU: images per second for every registered reward, with the tiny test models.

The learned rewards load the tiny random models of ``tests/helpers.py`` (open_clip in the Hub layout, a head in the
``.pth`` layout, an HPS-style checkpoint on a registered architecture, transformers CLIP, ALIGN and ViT saved with
``save_pretrained``) through their real loading code. A call does all the work a real one does (conversion to 8-bit
PIL images, the model's own preprocessing, the forward pass, the score), with networks far smaller than the real
ones: the figures are each reward's fixed cost per image, not the real network's. The named peer is
``jpeg_compressibility``, the weight-free reward of the quickstart: each reward's time per call ÷ the peer's.
``lambda_harmonic`` and ``dino_similarity`` get 4 reference images in the metadata, embedded on every call (as when
a caller passes them; a ``references`` folder is embedded once).

Each reward is called once to load it, then the rewards take turns, ``--rounds`` calls each, and the median time per
call counts, on two clocks: wall time, and the process's CPU time, which other load on a shared machine moves much
less (with one thread, CPU time is the work done).

    python bench/reward_speed.py [--batch 8] [--size 64] [--rounds 7] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's rewards

from tests.reward_models import (  # noqa: E402
    add_tiny_open_clip_architecture,
    aesthetic_head_state,
    save_pretrained_pair,
    save_tiny_open_clip,
    tiny_dino,
    tiny_open_clip,
    tiny_transformers_clip,
)
from train.rewards import REGISTRY, resolve_reward  # noqa: E402
from train.rewards.tiny import tiny_align  # noqa: E402

PEER = "jpeg_compressibility"
PROMPT = "a red fox in the snow"


def tiny_reward_options(folder: Path) -> dict[str, dict]:
    """Options that point every learned reward at a tiny model saved under ``folder``."""
    open_clip_model = f"local-dir:{save_tiny_open_clip(folder / 'open-clip')}"
    torch.save(aesthetic_head_state(embed_dim=16), folder / "aesthetic-head.pth")
    hps_architecture = add_tiny_open_clip_architecture(folder)
    torch.save({"state_dict": tiny_open_clip(seed=1).state_dict()}, folder / "HPS_v2.1_compressed.pt")
    pickscore = str(save_pretrained_pair(folder / "pickscore", *tiny_transformers_clip()))
    learned = {
        "clip_score": {"model": open_clip_model},
        "aesthetic": {"model": open_clip_model, "head": str(folder / "aesthetic-head.pth")},
        "hpsv2": {"model": hps_architecture, "checkpoint": str(folder / "HPS_v2.1_compressed.pt")},
        "pickscore": {"model": pickscore, "processor": pickscore},
        "sentiment": {"model": open_clip_model},
        "lambda_harmonic": {"model": str(save_pretrained_pair(folder / "align", *tiny_align()))},
        "dino_similarity": {"model": str(save_pretrained_pair(folder / "dino", *tiny_dino()))},
    }
    return {name: {**learned[name], "device": "cpu"} if name in learned else {} for name in sorted(REGISTRY)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the quickstart samples 64)")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per reward")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
    metadata = {
        "original_prompts": [PROMPT] * args.batch,
        "reference_images": torch.rand(4, 3, args.size, args.size, generator=generator),
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rewards = {name: resolve_reward(name, options) for name, options in tiny_reward_options(Path(tmp)).items()}
        for reward in rewards.values():
            reward(images, [PROMPT] * args.batch, metadata)  # loads the model
        times = {name: [] for name in rewards}
        for _ in range(args.rounds):
            for name, reward in rewards.items():
                start = time.perf_counter(), time.process_time()
                reward(images, [PROMPT] * args.batch, metadata)
                times[name].append((time.perf_counter() - start[0], time.process_time() - start[1]))

    wall = {name: statistics.median(t[0] for t in samples) for name, samples in times.items()}
    cpu = {name: statistics.median(t[1] for t in samples) for name, samples in times.items()}
    rows = [
        {"reward": name, "wall_seconds_per_call": wall[name], "cpu_seconds_per_call": cpu[name],
         "images_per_second_wall": args.batch / wall[name], "images_per_second_cpu": args.batch / cpu[name],
         "wall_vs_peer": wall[name] / wall[PEER], "cpu_vs_peer": cpu[name] / cpu[PEER]}
        for name in sorted(cpu, key=cpu.get)
    ]  # fmt: skip
    print(f"{args.batch} images of {args.size}×{args.size} per call, median of {args.rounds} calls, "
          f"{args.threads} thread(s), torch {torch.__version__}; load average {load_before:.1f} → "
          f"{os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(f"| reward | images/s (wall) | images/s (CPU time) | time ÷ {PEER} (wall) | (CPU time) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['reward']} | {row['images_per_second_wall']:.0f} | {row['images_per_second_cpu']:.0f} "
              f"| {row['wall_vs_peer']:.2f} | {row['cpu_vs_peer']:.2f} |")  # fmt: skip
    if args.json:
        report = {"batch": args.batch, "size": args.size, "rounds": args.rounds, "threads": args.threads,
                  "torch": torch.__version__, "peer": PEER, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
