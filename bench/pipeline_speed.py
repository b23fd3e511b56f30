"""Overhead of ParrotPipeline on CPU, measured side by side in one run.

1. Time per denoising step with Parrot guidance (three UNet branches: expansion_guidance_scale=5 and an
   expanded_prompt) ÷ plain CFG (expansion_guidance_scale=0, two branches), both ParrotPipeline. A step is the
   interval between two step-end callbacks (UNet call, guidance, scheduler step). Target ≤ 1.55; three branches
   against two make 1.5 the nominal floor.
2. Whole sampling wall time (text encoding, denoising, VAE decode) of ParrotPipeline with the expansion off ÷
   diffusers' StableDiffusionPipeline, loaded from the same folder, same seed and steps. Target ≤ 1.03.
3. Peak resident memory of a fresh subprocess that loads one of those two pipelines and samples once (this script
   re-invoked with a hidden --rss-child flag), read as VmHWM from /proc/self/status. Not getrusage's ru_maxrss:
   subprocess starts children with vfork, and Linux then hands the parent's high-water mark to the child's
   ru_maxrss. Target ≤ 1.10.

Each timing is warmed up once, then the two sides are interleaved (AB BA AB ...) for several rounds and medians
are compared, which damps drift and noise; measure 1 pools the steps of its runs. Timings are read on two clocks:
wall time, which the targets are about, and the process's CPU time, a cross-check that other load on a shared
machine moves much less (it leaves out time spent descheduled, though not the cost of shared caches and cores).

The model is Stable-Diffusion-shaped with random weights: a 37M-parameter UNet (UNET_CONFIG, cross-attention dim
768) on 32×32 latents, i.e. 256 px images, so the UNet dominates the time; the tokenizer, the 768-wide CLIP text
encoder, the VAE and the scheduler are those of ``parrot_pipeline.tiny``. It is written with save_pretrained and
read with from_pretrained.

    python bench/pipeline_speed.py [--quick] [--threads N] [--json PATH]

--threads defaults to 1: on a small, shared machine two threads on two busy cores make UNet times swing tenfold,
one keeps them steady. The exit code is 0 whatever the outcome: this is a report, not a test.
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

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's parrot_pipeline

UNET_CONFIG = dict(
    sample_size=32,
    block_out_channels=(128, 256, 256),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
PROMPT = "a photo of a cat sitting in a garden"
EXPANSION = "highly detailed, golden hour, soft natural lighting, sharp focus, bokeh, award winning photo"
PARROT_ON = dict(expansion_guidance_scale=5.0, expanded_prompt=EXPANSION)
PARROT_OFF = dict(expansion_guidance_scale=0.0)


def save_model(folder: Path) -> int:
    """Write the benchmark model to ``folder``; returns the UNet's parameter count."""
    from parrot_pipeline.tiny import tiny_pipeline_components

    components = tiny_pipeline_components(cross_attention_dim=768)
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**UNET_CONFIG)
    StableDiffusionPipeline(**components).save_pretrained(folder)
    return components["unet"].num_parameters()


def load(kind: str, folder: Path):
    """``kind`` "parrot" or "sd"; the SD side never imports parrot_pipeline, so its memory is diffusers' alone."""
    if kind == "parrot":
        from parrot_pipeline import ParrotPipeline as pipeline_class
    else:
        pipeline_class = StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps: int, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, guidance_scale=5.0, num_inference_steps=steps, generator=generator, output_type="np", **kwargs)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def step_times(pipe, steps: int, **kwargs) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of the steps after the first: the intervals between step-end callbacks."""
    stamps = []

    def stamp(pipe, i, t, tensors):
        stamps.append(clocks())
        return {}

    sample(pipe, steps, callback_on_step_end=stamp, **kwargs)
    return [elapsed(start, end) for start, end in zip(stamps, stamps[1:])]


def sampling_time(pipe, steps: int, **kwargs) -> list[tuple[float, float]]:
    start = clocks()
    sample(pipe, steps, **kwargs)
    return [elapsed(start, clocks())]


def interleaved(a, b, rounds: int):
    """Per-clock medians of the samples that ``a()`` and ``b()`` return: a warm-up call each, then ``rounds`` rounds
    of both, alternating which goes first (AB BA AB ...) so that a steady drift favours neither side."""
    a(), b()
    samples = {a: [], b: []}
    for round_ in range(rounds):
        for run in (a, b) if round_ % 2 == 0 else (b, a):
            samples[run] += run()
    return [[statistics.median(clock) for clock in zip(*samples[run])] for run in (a, b)]


def peak_rss_mib(kind: str, folder: Path, args) -> float:
    command = [sys.executable, __file__, "--rss-child", kind, "--model", str(folder), "--threads", str(args.threads)]
    output = subprocess.run(command + ["--quick"] * args.quick, check=True, capture_output=True, text=True).stdout
    return int(output.split()[-1]) / 1024


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def device(threads: int) -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    return (
        f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{threads} thread(s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds, for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, here and in the subprocesses")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--rss-child", choices=["parrot", "sd"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, step_rounds, sampling_rounds = (3, 1, 1) if args.quick else (8, 3, 8)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    if args.rss_child:
        sample(load(args.rss_child, args.model), steps, **PARROT_OFF if args.rss_child == "parrot" else {})
        print(peak_rss_kib())
        return

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        unet_parameters = save_model(folder)
        parrot, sd = load("parrot", folder), load("sd", folder)
        step_on, step_off = interleaved(
            lambda: step_times(parrot, steps, **PARROT_ON),
            lambda: step_times(parrot, steps, **PARROT_OFF),
            step_rounds,
        )
        sampling_parrot, sampling_sd = interleaved(
            lambda: sampling_time(parrot, steps, **PARROT_OFF), lambda: sampling_time(sd, steps), sampling_rounds
        )
        del parrot, sd
        rss_parrot, rss_sd = peak_rss_mib("parrot", folder, args), peak_rss_mib("sd", folder, args)

    measures = [
        ("step wall time (s), Parrot guidance / plain CFG", step_on[0], step_off[0], 1.55),
        ("step CPU time (s), Parrot guidance / plain CFG", step_on[1], step_off[1], 1.55),
        ("sampling wall time (s), Parrot (expansion off) / SD", sampling_parrot[0], sampling_sd[0], 1.03),
        ("sampling CPU time (s), Parrot (expansion off) / SD", sampling_parrot[1], sampling_sd[1], 1.03),
        ("peak RSS (MiB), Parrot (expansion off) / SD", rss_parrot, rss_sd, 1.10),
    ]
    report = {
        "device": device(args.threads),
        "unet_config": UNET_CONFIG,
        "unet_parameters": unet_parameters,
        "image_size": UNET_CONFIG["sample_size"] * 8,
        "steps": steps,
        "rounds": {"step": step_rounds, "sampling": sampling_rounds},
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "seconds": round(time.perf_counter() - started, 1),
        "measures": [
            {"measure": name, "a": a, "b": b, "ratio": a / b, "target": target, "pass": a / b <= target}
            for name, a, b, target in measures
        ],
    }

    print(f"{'measure':<52} {'A':>9} {'B':>9} {'A/B':>6}  target  result")
    for row in report["measures"]:
        verdict = "PASS" if row["pass"] else "FAIL"
        figures = f"{row['a']:>9.3f} {row['b']:>9.3f} {row['ratio']:>6.3f}"
        print(f"{row['measure']:<52} {figures}  ≤ {row['target']:.2f}  {verdict}")
    print(f"\ndevice: {report['device']}")
    print(
        f"UNet {unet_parameters / 1e6:.1f}M parameters, {report['image_size']} px, {steps} steps; rounds after "
        f"warm-up: {step_rounds} (step), {sampling_rounds} (sampling); load average {load_before[0]:.2f} before, "
        f"{report['load_average_before_after'][1]:.2f} after; {report['seconds']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
