"""Why the quickstart's run turns, and which defaults keep every reward up: each change alone, on several seeds.

Every run is the real command, ``python -m train --config configs/quickstart.yaml`` with its seed, its output
folder and the variant's overrides, so the figures are the quickstart a user runs. The variants and their settings
are fixed here before anything runs:

| variant | the one change against the preset |
|---|---|
| preset | none |
| lr-3e-3 | ``learning_rate: 0.003`` (the preset: 0.01) |
| cosine | ``lr_scheduler: cosine`` with 6 warm-up iterations |
| kl-anchor | ``kl_beta: 1.0``: DPOK's KL to the pretrained UNet, in parrot mode |
| advantage-clip-2 | ``advantage_clip: 2.0`` (the preset: 5) |
| frozen-expander | ``freeze_expander: true``: the expander keeps its supervised weights |
| cross-attention | ``lora_targets: cross_attention`` (the preset: every layer) |
| threads-2 | ``cpu_threads: 2`` (the preset: 1): the same run on another number of threads |

For each variant, over the seeds: each reward's held-out mean for the selected iterate (the bundle) and for the
last iterate against the base model, how many runs end with every reward at or above the base (selected and last),
the hypervolume gain of each (on each run's own scale over its base, selected and last iterate), the iteration the
validation selected, and the wall time of the whole command.

    python bench/quickstart_stability.py --seeds 0 1 2 --jobs 2 --json stability.json
    python bench/quickstart_stability.py --variants preset threads-2 --seeds 0 1 2 3 4 --json threads.json
    python bench/quickstart_stability.py --merge stability.json threads.json

Runs go ``--jobs`` at a time (each is one process on ``cpu_threads`` threads). The exit code is 0 whatever the
outcome: this is a report, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ["jpeg_compressibility", "colorfulness"]
VARIANTS = {
    "preset": [],
    "lr-3e-3": ["learning_rate=0.003"],
    "cosine": ["lr_scheduler=cosine", "lr_warmup_iterations=6"],
    "kl-anchor": ["kl_beta=1.0"],
    "advantage-clip-2": ["advantage_clip=2.0"],
    "frozen-expander": ["freeze_expander=true"],
    "cross-attention": ["lora_targets=cross_attention"],
    "threads-2": ["cpu_threads=2"],
}


def run(variant: str, seed: int, scratch: Path) -> dict:
    """One quickstart command; its evaluation.json and its wall time."""
    output = scratch / f"{variant}-seed{seed}"
    command = [sys.executable, "-m", "train", "--config", "configs/quickstart.yaml", f"output_dir={output}",
               f"seed={seed}", *VARIANTS[variant]]  # fmt: skip
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{finished.stderr[-3000:]}")
    evaluation = json.loads((output / "evaluation.json").read_text())
    last = evaluation.get("last", evaluation["trained"])
    return {
        "variant": variant, "seed": seed, "seconds": seconds,
        "base": evaluation["base"], "selected": evaluation["trained"], "last": last,
        "selected_iteration": evaluation["trained"]["iteration"],
    }  # fmt: skip


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.4g}"


def kept(entry: dict, which: str) -> bool:
    """Whether every reward of ``which`` iterate is at or above the base model's."""
    return all(entry[which]["means"][name] >= entry["base"]["means"][name] for name in REWARDS)


def report(runs: list[dict]) -> None:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    header = ["variant", "runs"]
    for which in ("selected", "last"):
        header += [f"{which}: Δ {name}" for name in REWARDS] + [f"{which}: all ≥ base", f"{which}: Δ hypervolume"]
    header += ["selected iteration", "s"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for variant in variants:
        entries = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        cells = [variant, str(len(entries))]
        for which in ("selected", "last"):
            cells += [spread([e[which]["means"][n] - e["base"]["means"][n] for e in entries]) for n in REWARDS]
            cells.append(f"{sum(kept(e, which) for e in entries)}/{len(entries)}")
            cells.append(spread([e[which]["hypervolume"] - e["base"]["hypervolume"] for e in entries]))
        cells.append(", ".join(str(e["selected_iteration"]) for e in entries))
        cells.append(f"{statistics.mean(e['seconds'] for e in entries):.0f}")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the runs here (after each one)")
    parser.add_argument("--merge", type=Path, nargs="+", help="report over these files instead of training")
    args = parser.parse_args()
    if args.merge:
        return report([entry for path in args.merge for entry in json.loads(path.read_text())["runs"]])
    runs = []
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run, variant, seed, Path(scratch)) for variant in args.variants for seed in args.seeds]
        for future in futures:
            runs.append(future.result())
            print(f"{runs[-1]['variant']} seed {runs[-1]['seed']}: {runs[-1]['seconds']:.0f} s", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    report(runs)


if __name__ == "__main__":
    main()
