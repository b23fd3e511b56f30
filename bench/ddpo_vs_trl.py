"""DDPO training speed against TRL's DDPOTrainer and against the bare work of an iteration, in one run, on the CPU.

Three trainers, each in a child process of this script, so that each one's peak memory is its own:

1. ``trl``: TRL 0.23.1's ``DDPOTrainer`` (the last TRL release that has it), in its own virtual environment
   (``--trl-python``; TRL needs ``transformers<5``), with this project's ``jpeg_compressibility`` as its reward;
2. ``ddpo``: this project's trainer in ``ddpo`` mode;
3. ``parrot``: this project's trainer in ``parrot`` mode (two rewards, 8 images per identifier, no prompt
   expansion), which back-propagates only the non-dominated samples.

An iteration is a whole one: sample, reward, update (TRL's ``DDPOTrainer.step``, our ``Trainer.train_iteration``).
Right after each, the same process times the *floor* of that iteration: the bare work it needs, in plain torch on
the same LoRA UNet and VAE, with fixed random inputs: the UNet forward passes of sampling (CFG: both branches in one
batch, as both trainers do), the VAE decode, and the forward + backward passes of training at every timestep over
the samples the iteration back-propagated (all of them for DDPO, the Pareto front for Parrot). Nothing else (text
encoding, scheduler arithmetic, log-probs, rewards, the optimiser step) counts, so no implementation can beat it
at equal settings. TRL's floor runs in TRL's environment (an older diffusers) and is printed beside ours.

The three children stay alive and take turns, round by round, so that they see the same drift of a shared
machine's load. Values are medians over the timed rounds; each ratio is the median over the rounds of a paired
ratio: an iteration against its own floor, or two trainers' images/s in the same round.

Shared settings: the tiny embedded model saved as a plain Stable Diffusion folder, 64 px, batch 8, 10 DDIM steps
with eta 1, guidance 5, LoRA rank 4 on the attention projections (TRL's only LoRA; ``lora_targets: attention``
here), one inner epoch and one optimiser step per iteration on both sides (one minibatch of all 8 samples, its
gradient accumulated over every timestep; ``gradient_accumulation_steps: 1`` here), PPO clip 1e-4,
per-prompt advantages, gradient-norm clip 1, AdamW at 3e-4, one torch thread (steadier on a small shared
machine). Wall time is what the targets are about; process CPU time is printed as a cross-check. Peak RSS is each
child's own ``VmHWM`` (not ``ru_maxrss``: a child started by ``subprocess`` inherits its parent's high-water mark
there); it includes the floor's passes, which are the same in every child.

``non_dominated_mask`` is timed at N = 4096, K = 4 and compared with an iteration producing 4096 images, taken as
4096 × the measured seconds per image of the ``parrot`` mode.

    python bench/ddpo_vs_trl.py [--iterations 10] [--warmup 2] [--threads 1] [--trl-python PATH] [--json PATH]

The TRL environment, once (``open_clip_torch`` because importing this project's rewards package imports it):

    python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 && \
        /work/trl-venv/bin/pip install trl==0.23.1 "transformers<5" diffusers peft accelerate open_clip_torch

The exit code is 0 whatever the outcome: this is a report, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline_speed import peak_rss_kib  # this script's folder, bench/, is first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout

BATCH = 8
STEPS = 10
GUIDANCE = 5.0
ETA = 1.0
LORA_RANK = 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # TRL's fixed LoRA targets; "attention" in train/config.py
LEARNING_RATE = 3e-4
CLIP_RANGE = 1e-4
PROMPTS = ROOT / "train" / "data" / "quickstart_prompts.txt"
EVAL_PROMPTS = ROOT / "train" / "data" / "quickstart_eval_prompts.txt"
PARROT_REWARDS = ["jpeg_compressibility", "colorfulness"]
MASK_N, MASK_K = 4096, 4


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def timed(function) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    start = clocks()
    function()
    end = clocks()
    return end[0] - start[0], end[1] - start[1]


def bare_work(unet, vae, model: str, batch: int = BATCH, steps: int = STEPS, autocast=contextlib.nullcontext):
    """``floor(groups, front)``: the bare passes of one iteration on ``unet`` (with its LoRA) and ``vae``, in plain
    torch: for each of ``groups`` batches of ``batch``, the CFG UNet forward passes of ``steps`` sampling steps and
    the VAE decode; then the forward + backward passes of training at every timestep over ``front`` samples, in
    batches as the trainers take them, under ``autocast`` (the trainer's mixed precision). Fixed random inputs on the
    UNet's device and in its dtype: the cost of these passes does not depend on the values."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator).to(device, dtype)
    embeds = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)

    def floor(groups: int, front: int) -> None:
        with torch.no_grad(), autocast():
            for _ in range(groups):
                for timestep in scheduler.timesteps:
                    unet(torch.cat([latents, latents]), timestep, encoder_hidden_states=embeds)
                vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor)
        for start in range(0, front, batch):
            n = min(batch, front - start)
            conditioning = torch.cat([embeds[:n], embeds[batch : batch + n]])
            inputs = torch.cat([latents[:n], latents[:n]])
            for timestep in scheduler.timesteps:
                with autocast():
                    output = unet(inputs, timestep, encoder_hidden_states=conditioning).sample
                output.float().mean().backward()
        unet.zero_grad(set_to_none=True)

    return floor


def serve(iteration, floor, groups: int) -> None:
    """Answer the parent: each ``step`` line on stdin times one whole iteration (it returns how many samples it
    back-propagated), then the floor of that same iteration; ``end`` reports the peak RSS. Replies are stdout lines
    starting with ``@bench``, so that anything a library prints is never taken for one."""
    for line in sys.stdin:
        if line.strip() != "step":
            break
        front = []
        real = timed(lambda: front.append(iteration()))
        bare = timed(lambda: floor(groups, front[0]))
        reply({"real": real, "floor": bare, "front": front[0]})
    reply({"rss_kib": peak_rss_kib(), "images_per_iteration": groups * BATCH})


def reply(message: dict) -> None:
    print("@bench " + json.dumps(message), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Children: each loads its trainer, says which diffusers it runs, then serves ``step`` requests.


def child_trl(args) -> None:
    """TRL's DDPOTrainer, one batch per epoch; each ``step`` is an iteration."""
    from accelerate import PartialState

    PartialState(cpu=True)  # before TRL's first log line, so that TRL's Accelerator stays on the CPU
    import diffusers
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from train.rewards import resolve_reward

    reward = resolve_reward("jpeg_compressibility")
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, prompts, metadata):
        return reward(images, prompts, metadata), {}

    config = DDPOConfig(
        save_freq=10**9, mixed_precision="no", log_with=None,
        project_kwargs={"project_dir": args.scratch}, seed=0,
        sample_num_steps=STEPS, sample_eta=ETA, sample_guidance_scale=GUIDANCE,
        sample_batch_size=BATCH, sample_num_batches_per_epoch=1, train_batch_size=BATCH,
        train_gradient_accumulation_steps=1, train_num_inner_epochs=1, train_timestep_fraction=1.0, train_cfg=True,
        train_learning_rate=LEARNING_RATE, train_clip_range=CLIP_RANGE, train_max_grad_norm=1.0,
        per_prompt_stat_tracking=True,
    )  # fmt: skip
    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    state = {"epoch": 0, "global_step": 0}

    def iteration():
        state["global_step"] = trainer.step(state["epoch"], state["global_step"])
        state["epoch"] += 1
        return BATCH

    reply({"diffusers": diffusers.__version__})
    serve(iteration, bare_work(pipeline.unet, pipeline.vae, args.model), 1)


def trainer_config(mode: str, args):
    from train.config import TrainConfig

    common = dict(
        output_dir=str(Path(args.scratch) / mode), overwrite=True, seed=0, device="cpu", pretrained_model=args.model,
        expander_model=None, prompts=str(PROMPTS), eval_prompts=str(EVAL_PROMPTS), resolution=64,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=ETA, images_per_prompt=BATCH, train_batch_size=BATCH,
        timestep_fraction=1.0, gradient_accumulation_steps=1, num_inner_epochs=1, learning_rate=LEARNING_RATE,
        weight_decay=1e-4,
        max_grad_norm=1.0, lora_rank=LORA_RANK, lora_targets="attention", eval_every=0,
    )  # fmt: skip
    if mode == "ddpo":
        return TrainConfig(mode="ddpo", rewards=["jpeg_compressibility"], advantage="per_prompt", clip_range=CLIP_RANGE,
                           **common)  # fmt: skip
    return TrainConfig(mode="parrot", rewards=PARROT_REWARDS, advantage="batch", **common)


def child_ours(mode: str, args) -> None:
    """This project's Trainer; each ``train_iteration`` (sample + reward + update) is an iteration."""
    import diffusers

    from train.parrot import Trainer

    trainer = Trainer(trainer_config(mode, args))
    groups = len(trainer.branch_texts("", ""))

    def iteration():
        record = trainer.train_iteration()
        trainer.iteration += 1
        return round(record["front_fraction"] * groups * BATCH)

    reply({"diffusers": diffusers.__version__})
    serve(iteration, bare_work(trainer.pipe.unet, trainer.pipe.vae, args.model), groups)


# ---------------------------------------------------------------------------------------------------------------------
# The parent: run the children, then compare.


class Child:
    """One child process, started with the model loaded and waiting for ``step`` lines."""

    def __init__(self, kind: str, python: str, model: Path, scratch: Path, threads: int):
        self.kind = kind
        command = [python, __file__, "--child", kind, "--model", str(model), "--scratch", str(scratch),
                   "--threads", str(threads)]  # fmt: skip
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.log = open(scratch / f"{kind}.log", "w+")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=scratch,
            env=environment,
        )  # fmt: skip
        self.info = self.read()

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("@bench "):
                return json.loads(line[len("@bench ") :])
        self.log.seek(0)
        raise RuntimeError(f"child {self.kind!r} stopped (exit code {self.process.wait()}):\n{self.log.read()[-4000:]}")

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.read()

    def finish(self) -> dict:
        final = self.ask("end")
        self.process.wait()
        self.log.close()
        return self.info | final


def run_children(args, model: Path, scratch: Path) -> dict:
    """Start the three children (each answers once its model is loaded), then interleave their iterations round by
    round, the order reversed every other round, so that all three see the same drift of a shared machine's load."""
    children = [
        Child("trl", args.trl_python, model, scratch, args.threads),
        Child("ddpo", sys.executable, model, scratch, args.threads),
        Child("parrot", sys.executable, model, scratch, args.threads),
    ]
    pairs = {child.kind: [] for child in children}
    for round_ in range(args.warmup + args.iterations):
        for child in children if round_ % 2 == 0 else children[::-1]:
            answer = child.ask("step")
            if round_ >= args.warmup:
                pairs[child.kind].append(answer)
        print(f"  round {round_ + 1}/{args.warmup + args.iterations}", flush=True)
    return {child.kind: child.finish() | {"pairs": pairs[child.kind]} for child in children}


def save_model(folder: Path) -> None:
    """The tiny embedded model as a plain Stable Diffusion folder, which TRL's pipeline loads as it is.

    transformers 5 saves the tokenizer as ``tokenizer.json`` alone; TRL's transformers 4 also needs the
    ``vocab.json`` and ``merges.txt`` of the slow CLIP tokenizer, written here from the same vocabulary and merges.
    """
    from diffusers import StableDiffusionPipeline

    from parrot_pipeline.tiny import default_tiny_model

    StableDiffusionPipeline.from_pretrained(
        default_tiny_model(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    tokenizer = folder / "tokenizer"
    bpe = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (tokenizer / "vocab.json").write_text(json.dumps(bpe["vocab"]), encoding="utf-8")
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in bpe["merges"]]
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def mask_seconds(repeats: int = 5) -> float:
    """Median wall seconds of ``non_dominated_mask`` on N × K random rewards, after one untimed call."""
    from train.pareto import non_dominated_mask

    rewards = torch.randn(MASK_N, MASK_K, generator=torch.Generator().manual_seed(0))
    non_dominated_mask(rewards)
    return statistics.median(timed(lambda: non_dominated_mask(rewards))[0] for _ in range(repeats))


def summary(child: dict) -> dict:
    """Medians of one child's timed iterations and their floors, per clock (0: wall, 1: CPU)."""
    pairs = child["pairs"]
    images = child["images_per_iteration"]
    real = [statistics.median(pair["real"][c] for pair in pairs) for c in (0, 1)]
    bare = [statistics.median(pair["floor"][c] for pair in pairs) for c in (0, 1)]
    return {
        "seconds": real,
        "floor_seconds": bare,
        "images_per_second": [images / seconds for seconds in real],
        "floor_images_per_second": [images / seconds for seconds in bare],
        "of_floor": [statistics.median(pair["floor"][c] / pair["real"][c] for pair in pairs) for c in (0, 1)],
        "above_floor": [statistics.median(pair["real"][c] - pair["floor"][c] for pair in pairs) for c in (0, 1)],
    }


def speedup(child: dict, peer: dict, clock: int) -> float:
    """Median over the rounds of ``child``'s images/s ÷ ``peer``'s in the same round (the two ran back to back)."""
    return statistics.median(
        (child["images_per_iteration"] / mine["real"][clock]) / (peer["images_per_iteration"] / theirs["real"][clock])
        for mine, theirs in zip(child["pairs"], peer["pairs"])
    )


def analyse(results: dict) -> dict:
    trl, ddpo, parrot = (summary(results[name]) for name in ("trl", "ddpo", "parrot"))
    fronts = [pair["front"] for pair in results["parrot"]["pairs"]]
    front_fraction = statistics.mean(fronts) / results["parrot"]["images_per_iteration"]
    mask = mask_seconds()
    mask_reference = parrot["seconds"][0] / results["parrot"]["images_per_iteration"] * MASK_N
    rss_ddpo, rss_trl = results["ddpo"]["rss_kib"] / 1024, results["trl"]["rss_kib"] / 1024
    wall, cpu = 0, 1
    rows = [
        # measure, value, reference, ratio, target, pass (None: a figure without a target)
        ("floor, images/s: TRL's env (diffusers " + results["trl"]["diffusers"] + ") vs ours",
         trl["floor_images_per_second"][wall], ddpo["floor_images_per_second"][wall],
         ddpo["floor_seconds"][wall] / trl["floor_seconds"][wall], "≈ 1", None),
        ("TRL DDPOTrainer, images/s; ratio: of the floor", trl["images_per_second"][wall],
         trl["floor_images_per_second"][wall], trl["of_floor"][wall], "", None),
        ("ddpo mode, images/s; ratio: of the floor", ddpo["images_per_second"][wall],
         ddpo["floor_images_per_second"][wall], ddpo["of_floor"][wall], "≥ 0.92", ddpo["of_floor"][wall] >= 0.92),
        ("ddpo mode vs TRL, images/s", ddpo["images_per_second"][wall], trl["images_per_second"][wall],
         speedup(results["ddpo"], results["trl"], wall), "> 1", speedup(results["ddpo"], results["trl"], wall) > 1),
        ("  cross-check: ddpo vs TRL, fraction of floor", ddpo["of_floor"][wall], trl["of_floor"][wall],
         ddpo["of_floor"][wall] / trl["of_floor"][wall], "> 1", None),
        ("  cross-check, CPU time: ddpo vs TRL, ms above the floor", ddpo["above_floor"][cpu] * 1000,
         trl["above_floor"][cpu] * 1000, ddpo["above_floor"][cpu] / trl["above_floor"][cpu], "< 1", None),
        ("  cross-check, CPU time: ddpo, of the floor", ddpo["images_per_second"][cpu],
         ddpo["floor_images_per_second"][cpu], ddpo["of_floor"][cpu], "≥ 0.92", None),
        ("  cross-check, CPU time: ddpo vs TRL, images/s", ddpo["images_per_second"][cpu],
         trl["images_per_second"][cpu], speedup(results["ddpo"], results["trl"], cpu), "> 1", None),
        ("peak RSS, MiB: ddpo mode vs TRL", rss_ddpo, rss_trl, rss_ddpo / rss_trl, "≤ 1", rss_ddpo <= rss_trl),
        ("parrot mode, images/s; ratio: of its floor", parrot["images_per_second"][wall],
         parrot["floor_images_per_second"][wall], parrot["of_floor"][wall], "≥ 0.90",
         parrot["of_floor"][wall] >= 0.9),
        ("  cross-check, CPU time: parrot, of its floor", parrot["images_per_second"][cpu],
         parrot["floor_images_per_second"][cpu], parrot["of_floor"][cpu], "≥ 0.90", None),
        ("parrot mode vs TRL, images/s", parrot["images_per_second"][wall], trl["images_per_second"][wall],
         speedup(results["parrot"], results["trl"], wall), "", None),
        ("parrot mode, fraction of samples back-propagated", front_fraction, None, None, "", None),
        (f"non_dominated_mask N={MASK_N} K={MASK_K}, ms vs a {MASK_N}-image iteration", mask * 1000,
         mask_reference * 1000, mask / mask_reference, "≤ 0.01", mask / mask_reference <= 0.01),
    ]  # fmt: skip
    return {
        "rows": [dict(zip(("measure", "value", "reference", "ratio", "target", "pass"), row)) for row in rows],
        "summaries": {"trl": trl, "ddpo": ddpo, "parrot": parrot},
        "parrot_front_fraction": front_fraction,
        "mask_seconds": mask,
    }


def print_table(report: dict) -> None:
    print(f"\n{'measure':<64} {'value':>9} {'reference':>9} {'ratio':>6}  {'target':<6} result")
    for row in report["rows"]:
        reference = f"{row['reference']:>9.3f}" if row["reference"] is not None else " " * 9
        ratio = f"{row['ratio']:>6.3f}" if row["ratio"] is not None else " " * 6
        verdict = {True: "PASS", False: "FAIL", None: ""}[row["pass"]]
        print(f"{row['measure']:<64} {row['value']:>9.3f} {reference} {ratio}  {row['target']:<6} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations of each trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations of each trainer first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    parser.add_argument("--trl-python", default="/work/trl-venv/bin/python", help="python of the TRL environment")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", choices=["trl", "ddpo", "parrot"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    logging.disable(logging.WARNING)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if args.child:
        if args.child == "trl":
            child_trl(args)
        else:
            child_ours(args.child, args)
        return

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = scratch / "model"
        save_model(model)
        print(f"{args.warmup} warm-up + {args.iterations} timed rounds, {args.threads} thread(s):")
        results = run_children(args, model, scratch)
    report = analyse(results)
    report.update(
        threads=args.threads, iterations=args.iterations, warmup=args.warmup,
        load_average_before_after=[load_before, os.getloadavg()[0]], seconds=round(time.perf_counter() - started, 1),
        children=results,
    )  # fmt: skip
    print_table(report)
    seconds = {name: summary["seconds"][0] for name, summary in report["summaries"].items()}
    print(
        f"\nmedian seconds per iteration (wall): TRL {seconds['trl']:.3f} and ddpo {seconds['ddpo']:.3f} (8 images), "
        f"parrot {seconds['parrot']:.3f} ({results['parrot']['images_per_iteration']} images); load average "
        f"{load_before:.2f} before, {report['load_average_before_after'][1]:.2f} after; {report['seconds']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
