"""What scoring rewards in a worker thread, while the next chunk samples, gains per training iteration.

The peer is the same loop scoring in line (``reward_worker_overlap=false``), measured in the same run: both arms
alternate, ``--rounds`` times each, and the median seconds per iteration count. Setting: the tiny embedded model,
``--size`` px, 2 identifiers × 8 images in chunks of ``--chunk``, 10 DDIM steps, Parrot mode without expander,
rewards given by ``--rewards`` (weight-free by default: JPEG compressibility and colourfulness, whose work is PIL
and numpy code that leaves the interpreter lock while it runs). Torch uses ``--threads`` intra-op threads, so the
reward thread has a core of its own on a machine with ``threads + 1`` cores.

    python bench/reward_overlap.py [--rounds 5] [--size 128] [--chunk 4] [--threads 1]
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


def trainer(output: Path, overlap: bool, args) -> Trainer:
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={output}", "overwrite=true", "expander_model=null", f"resolution={args.size}",
        "num_inference_steps=10", "images_per_prompt=8", f"train_batch_size={args.chunk}", "eval_every=0",
        f"rewards=[{args.rewards}]", f"reward_worker_overlap={str(overlap).lower()}",
    ])  # fmt: skip
    return Trainer(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rewards", default="jpeg_compressibility,colorfulness")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    overlapped, in_line = statistics.median(times[True]), statistics.median(times[False])
    images = 16
    print(f"setting: {args.size} px, 16 images in chunks of {args.chunk}, rewards {args.rewards}, "
          f"torch threads {args.threads}, {args.rounds} rounds")  # fmt: skip
    print("| arm | s / iteration (median) | images/s |")
    print("|---|---|---|")
    print(f"| scoring in line (peer) | {in_line:.3f} | {images / in_line:.1f} |")
    print(f"| scoring in a worker thread | {overlapped:.3f} | {images / overlapped:.1f} |")
    print(f"speed-up of the worker thread over the peer: {in_line / overlapped:.3f}×")


if __name__ == "__main__":
    main()
