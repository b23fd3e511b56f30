"""One prepared check on one GPU, at most 4 minutes: the pipeline's overhead and a training iteration at full size.

1. The model: Stable Diffusion 1.5's exact architecture with random weights (``parrot_pipeline.tiny.sd15_components``),
   saved in float16 with ``save_pretrained`` and read back with ``from_pretrained``.
2. Pipeline overhead at 512 px in fp16, as ``bench/pipeline_speed.py`` measures it on the CPU: time per step with
   Parrot guidance ÷ plain CFG (target ≤ 1.55), whole sampling with the expansion off ÷ ``StableDiffusionPipeline``
   (≤ 1.03), and the peak GPU memory of those two, each pipeline alone on the GPU (≤ 1.10).
3. One training iteration of ``parrot`` (2 identifiers × 8 images, the tiny expander) and of ``ddpo`` (16 images of
   the prompt), 512 px, 50 DDIM steps, every timestep trained, one optimiser step, under ``mixed_precision`` bf16 and
   fp16: wall seconds against the iteration's floor of bare passes (``bench/ddpo_vs_trl.py``'s ``bare_work``: the
   sampling forwards, the VAE decode and the training forwards and backwards, in plain torch on the same UNet) and
   the peak GPU memory.
4. With two GPUs or more, two parrot iterations under ``accelerate launch --multi_gpu --num_processes 2``.

    bash bench/gpu_check.sh [--json PATH]       # on the GPU machine; bench/gpu_wheels.sh, run here, brings its wheels
    bash bench/gpu_check.sh --quick             # the same on the CPU with the tiny model, to check the script

The exit code is 0 whatever the figures: this is a report, not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline

from ddpo_vs_trl import bare_work  # this script's folder, bench/, is first on sys.path
from pipeline_speed import EXPANSION, PROMPT, interleaved

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout

from parrot_pipeline import ParrotPipeline  # noqa: E402
from parrot_pipeline.tiny import sd15_components, tiny_pipeline_components  # noqa: E402

FULL = {"device": "cuda", "dtype": torch.float16, "size": 512, "pipeline_steps": 20, "rounds": 3, "train_steps": 50,
        "images": 8, "precisions": ["bf16", "fp16"]}  # fmt: skip
QUICK = {"device": "cpu", "dtype": torch.float32, "size": 64, "pipeline_steps": 3, "rounds": 1, "train_steps": 4,
         "images": 2, "precisions": ["no"]}  # fmt: skip


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak_memory(device: str) -> None:
    """Start a peak-memory reading with nothing left of earlier models (trainers hold reference cycles)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def save_model(folder: Path, settings: dict) -> None:
    components = sd15_components(settings["dtype"]) if settings is FULL else tiny_pipeline_components()
    StableDiffusionPipeline(**components).save_pretrained(folder)


def pipeline_overhead(model: Path, settings: dict) -> dict:
    device, steps = settings["device"], settings["pipeline_steps"]
    parrot = ParrotPipeline.from_pretrained(model, torch_dtype=settings["dtype"]).to(device)
    sd = StableDiffusionPipeline.from_pretrained(model, torch_dtype=settings["dtype"]).to(device)
    for pipe in (parrot, sd):
        pipe.set_progress_bar_config(disable=True)

    def sample(pipe, **kwargs):
        generator = torch.Generator(device).manual_seed(0)
        pipe(PROMPT, height=settings["size"], width=settings["size"], guidance_scale=5.0, num_inference_steps=steps,
             generator=generator, output_type="np", **kwargs)  # fmt: skip

    def step_times(**kwargs):
        stamps = []

        def stamp(pipe, i, t, tensors):
            synchronize(device)
            stamps.append((time.perf_counter(), time.process_time()))
            return {}

        sample(parrot, callback_on_step_end=stamp, **kwargs)
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]

    def sampling(pipe, **kwargs):
        synchronize(device)
        start = (time.perf_counter(), time.process_time())
        sample(pipe, **kwargs)
        synchronize(device)
        return [(time.perf_counter() - start[0], time.process_time() - start[1])]

    step_on, step_off = interleaved(lambda: step_times(expansion_guidance_scale=5.0, expanded_prompt=EXPANSION),
                                    lambda: step_times(expansion_guidance_scale=0.0), settings["rounds"])  # fmt: skip
    with_parrot, with_sd = interleaved(lambda: sampling(parrot, expansion_guidance_scale=0.0), lambda: sampling(sd),
                                       settings["rounds"])  # fmt: skip
    memory = {}
    for name, pipe, other, kwargs in (("parrot", parrot, sd, {"expansion_guidance_scale": 0.0}), ("sd", sd, parrot, {})):
        other.to("cpu")
        pipe.to(device)
        reset_peak_memory(device)
        sample(pipe, **kwargs)
        memory[name] = peak_memory_gib(device)
    return {
        "step_ratio": step_on[0] / step_off[0], "sampling_ratio": with_parrot[0] / with_sd[0],
        "memory_ratio": memory["parrot"] / memory["sd"] if memory["sd"] else None,
        "step_seconds": [step_on[0], step_off[0]], "sampling_seconds": [with_parrot[0], with_sd[0]],
        "peak_memory_gib": memory,
    }  # fmt: skip


def training_iteration(mode: str, precision: str, model: Path, scratch: Path, settings: dict) -> dict:
    """One timed iteration (after the floor has run once, which warms the kernels of these shapes), then its floor."""
    from accelerate.state import AcceleratorState

    from train.config import load_config
    from train.parrot import Trainer

    images, steps = settings["images"], settings["train_steps"]
    overrides = [
        f"output_dir={scratch / f'{mode}-{precision}'}", "overwrite=true", f"pretrained_model={model}",
        f"device={settings['device']}", f"mixed_precision={precision}", f"resolution={settings['size']}",
        f"num_inference_steps={steps}", "timestep_fraction=1.0", "gradient_accumulation_steps=null", "eval_every=0",
        f"train_batch_size={images}", "rewards=[jpeg_compressibility, colorfulness]", "expander_sft_data=null",
        "cpu_threads=null",
    ]  # fmt: skip
    if mode == "parrot":
        overrides += [f"images_per_prompt={images}", "advantage=batch"]
    else:
        overrides += ["mode=ddpo", "expander_model=null", f"images_per_prompt={2 * images}", "advantage=per_prompt",
                      "clip_range=1.0e-4", "eval_expansion_guidance_scale=0.0"]  # fmt: skip
    trainer = Trainer(load_config(ROOT / "configs" / "quickstart.yaml", overrides))
    floor = bare_work(trainer.pipe.unet, trainer.pipe.vae, str(model), batch=images, steps=steps,
                      autocast=trainer.accelerator.autocast)  # fmt: skip
    floor(1, 1)
    reset_peak_memory(settings["device"])
    synchronize(settings["device"])
    started = time.perf_counter()
    record = trainer.train_iteration()
    synchronize(settings["device"])
    seconds = time.perf_counter() - started
    memory = peak_memory_gib(settings["device"])
    front = round(record["front_fraction"] * 2 * images)
    started = time.perf_counter()
    floor(2, front)  # two sampling batches of `images` in both modes
    synchronize(settings["device"])
    floor_seconds = time.perf_counter() - started
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"mode": mode, "precision": precision, "seconds": seconds, "floor_seconds": floor_seconds,
            "floor_fraction": floor_seconds / seconds, "back_propagated": front, "peak_memory_gib": memory,
            "optimizer_steps": record.get("optimizer_steps"), "skipped": record.get("skipped")}  # fmt: skip


def two_processes(model: Path, scratch: Path, settings: dict) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16", "-m", "train",
               "--config", "configs/quickstart.yaml", f"output_dir={scratch / 'two'}", "overwrite=true",
               f"pretrained_model={model}", "device=cuda", "mixed_precision=bf16", f"resolution={settings['size']}",
               f"num_inference_steps={settings['train_steps']}", "iterations=2", "eval_every=0",
               f"images_per_prompt={settings['images']}", "expander_sft_data=null", "cpu_threads=null"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"returncode": result.returncode, "seconds": time.perf_counter() - started,
            "stderr_tail": result.stderr[-2000:] if result.returncode else ""}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model on the CPU: checks the script")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if settings["device"] == "cuda" else "CPU"
    report = {"device": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "settings": {k: str(v) for k, v in settings.items()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        save_model(scratch / "model", settings)
        report["pipeline"] = pipeline_overhead(scratch / "model", settings)
        print(f"pipeline, {settings['size']} px {settings['dtype']}: step Parrot/CFG {report['pipeline']['step_ratio']:.3f} "
              f"(≤ 1.55), sampling Parrot/SD {report['pipeline']['sampling_ratio']:.3f} (≤ 1.03), peak memory "
              f"Parrot/SD {report['pipeline']['memory_ratio'] or float('nan'):.3f} (≤ 1.10)", flush=True)  # fmt: skip
        report["training"] = []
        for precision in settings["precisions"]:
            for mode in ("parrot", "ddpo"):
                row = training_iteration(mode, precision, scratch / "model", scratch, settings)
                report["training"].append(row)
                print(f"{mode} {precision}: {row['seconds']:.2f} s per iteration, floor {row['floor_seconds']:.2f} s "
                      f"({row['floor_fraction']:.3f} of it), {row['back_propagated']} samples back-propagated, "
                      f"peak {row['peak_memory_gib'] or float('nan'):.1f} GiB", flush=True)  # fmt: skip
        gpus = torch.cuda.device_count() if settings["device"] == "cuda" else 0
        report["two_processes"] = two_processes(scratch / "model", scratch, settings) if gpus >= 2 else None
        print("two processes: " + (json.dumps(report["two_processes"]) if gpus >= 2 else f"{gpus} GPU(s), not run"))
    report["seconds"] = time.perf_counter() - started
    print(f"{report['device']}, torch {report['torch']}, diffusers {report['diffusers']}, transformers "
          f"{report['transformers']}: {report['seconds']:.0f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
