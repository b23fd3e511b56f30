"""Images per second of one training run spread over 2 CPU processes, against the same run in 1 process.

Both arms are real ``accelerate launch`` runs (torchrun, gloo) of this project's ``Trainer`` with the same global
batch: 16 images per iteration (``ddpo`` mode on the tiny model, 64 px, 10 DDIM steps, every timestep trained), so
with 2 processes each samples and trains 8 and they exchange rewards and gradients every iteration. Each process
uses ``--threads`` torch threads (default 1, so 2 processes need 2 cores). The peer is the 1-process run; the arms
alternate ``--rounds`` times and the median of each arm's per-iteration time counts.

    python bench/multiprocess_speed.py [--rounds 3] [--iterations 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
IMAGES = 16
SETTINGS = ["mode=ddpo", "expander_model=null", "rewards=[jpeg_compressibility]", "device=cpu", "resolution=64",
            "num_inference_steps=10", f"images_per_prompt={IMAGES}", "train_batch_size=8", "eval_every=0",
            "advantage=per_prompt", "clip_range=0.0001", "lora_targets=attention", "lora_rank=4"]  # fmt: skip


def child(output: Path, warmup: int, iterations: int) -> None:
    """Runs in every process of an ``accelerate launch``: time whole iterations; rank 0 writes them."""
    sys.path.insert(0, str(REPOSITORY))
    from train.config import load_config
    from train.parrot import Trainer

    trainer = Trainer(load_config("configs/quickstart.yaml", [f"output_dir={output / 'run'}", "overwrite=true",
                                                               *SETTINGS]))  # fmt: skip
    seconds = []
    for index in range(warmup + iterations):
        trainer.accelerator.wait_for_everyone()
        started = time.perf_counter()
        trainer.train_iteration()
        trainer.accelerator.wait_for_everyone()
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    if trainer.accelerator.is_main_process:
        (output / "seconds.json").write_text(json.dumps(seconds))


def launch(processes: int, threads: int, warmup: int, iterations: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        multi = ["--multi_gpu"] if processes > 1 else []  # accelerate refuses --multi_gpu for one process
        command = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   __file__, "--child", folder, "--warmup", str(warmup), "--iterations", str(iterations)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, cwd=REPOSITORY, env=env, check=True, capture_output=True)
        return json.loads((Path(folder) / "seconds.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        child(args.child, args.warmup, args.iterations)
        return
    seconds = {1: [], 2: []}
    for _ in range(args.rounds):
        for processes in (1, 2):
            seconds[processes] += launch(processes, args.threads, args.warmup, args.iterations)
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    print(f"{IMAGES} images per iteration (global), {args.rounds} rounds × {args.iterations} timed iterations, "
          f"{args.threads} torch thread(s) per process, {os.cpu_count()} CPUs")  # fmt: skip
    print("| processes | s / iteration (median) | images/s |")
    print("|---|---|---|")
    print(f"| 1 (peer) | {one:.3f} | {IMAGES / one:.2f} |")
    print(f"| 2 | {two:.3f} | {IMAGES / two:.2f} |")
    print(f"2 processes against 1: {one / two:.3f}× the images/s")


if __name__ == "__main__":
    main()
