"""What scoring rewards in a worker thread, while the next chunk samples, gains per training iteration.

The peer is the same loop scoring in line (``reward_worker_overlap=false``), measured in the same run: both arms
alternate, ``--rounds`` times each, and the median seconds per iteration count. Setting: the tiny embedded model,
``--size`` px, 2 identifiers × 8 images in chunks of ``--chunk``, 10 DDIM steps, Parrot mode without expander.
The rewards are JPEG compressibility and a stand-in for a learned reward network: ``--network-ms`` milliseconds of
matrix products per image (torch work that, like a real reward model's forward pass, leaves the interpreter lock
while it runs), because the tiny random reward models cost next to nothing and a real one (a CLIP ViT-L/14 costs
tens of milliseconds per image even on a GPU) cannot be downloaded here. Torch uses ``--threads`` intra-op
threads, so the reward thread has a core of its own on a machine with ``threads + 1`` cores.

    python bench/reward_overlap.py [--rounds 5] [--size 64] [--chunk 4] [--network-ms 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout

from train.config import load_config  # noqa: E402
from train.parrot import Trainer  # noqa: E402
from train.rewards import score_images  # noqa: E402


NETWORK = {"weights": torch.randn(256, 256) / 16, "products": 1}


def stand_in_network(images, prompts, metadata):
    """``NETWORK["products"]`` matrix products per image: the cost of a reward network's forward pass."""
    state = torch.ones(len(images), 256)
    for _ in range(NETWORK["products"]):
        state = torch.tanh(state @ NETWORK["weights"])
    return state.mean(dim=1) + images.mean(dim=(1, 2, 3))


def calibrate(milliseconds: float) -> None:
    """Set the number of products so the stand-in costs ``milliseconds`` per image."""
    NETWORK["products"] = 200
    started = time.perf_counter()
    stand_in_network(torch.rand(16, 3, 8, 8), None, None)
    per_product = (time.perf_counter() - started) / 200 / 16
    NETWORK["products"] = max(1, round(milliseconds / 1000 / per_product))


def trainer(output: Path, overlap: bool, args) -> Trainer:
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={output}", "overwrite=true", "expander_model=null", f"resolution={args.size}",
        "num_inference_steps=10", "images_per_prompt=8", f"train_batch_size={args.chunk}", "eval_every=0",
        "rewards=[jpeg_compressibility, __main__:stand_in_network]", f"reward_worker_overlap={str(overlap).lower()}",
    ])  # fmt: skip
    return Trainer(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--network-ms", type=float, default=40.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calibrate(args.network_ms)
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        trainers = {}
        for overlap in (True, False):
            trainers[overlap] = trainer(Path(folder) / str(overlap), overlap, args)
            trainers[overlap].train_iteration()  # warm-up
        for _ in range(args.rounds):
            for overlap in (True, False):
                started = time.perf_counter()
                trainers[overlap].train_iteration()
                times[overlap].append(time.perf_counter() - started)
        rewards = trainers[False].reward_fns
        images = torch.rand(16, 3, args.size, args.size)
        metadata = {"original_prompts": ["a cat"] * 16, "expanded_prompts": ["a cat"] * 16}
        scoring = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for chunk in images.split(args.chunk):
                score_images(rewards, chunk, ["a cat"] * len(chunk), metadata)
            scoring.append(time.perf_counter() - started)
    overlapped, in_line = statistics.median(times[True]), statistics.median(times[False])
    images = 16
    print(f"setting: {args.size} px, 16 images in chunks of {args.chunk}, JPEG + a {args.network_ms:g} ms/image "
          f"stand-in network, "
          f"torch threads {args.threads}, {args.rounds} rounds")  # fmt: skip
    print("| arm | s / iteration (median) | images/s |")
    print("|---|---|---|")
    print(f"| scoring in line (peer) | {in_line:.3f} | {images / in_line:.1f} |")
    print(f"| scoring in a worker thread | {overlapped:.3f} | {images / overlapped:.1f} |")
    print(f"speed-up of the worker thread over the peer: {in_line / overlapped:.3f}×")
    reward_seconds = statistics.median(scoring)
    print(f"scoring the 16 images alone: {reward_seconds:.3f} s, {reward_seconds / in_line:.1%} of the in-line "
          f"iteration: the most the worker thread can hide; it hid {(in_line - overlapped) / reward_seconds:.0%} of it")


if __name__ == "__main__":
    main()
