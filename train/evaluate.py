"""``python -m train.evaluate``: score a pipeline on a prompt set with several rewards and compare configurations.

Every (configuration, prompt, seed) gives one image, saved under ``DIR/images/<configuration>/`` with a JSON record
of its prompt, expansion, scales and reward values. A record is written only once its image is, and an interrupted
run started again with the same command skips the images that have one. ``results.csv``, ``summary.md`` and
``grid.png`` are rebuilt from the records at the end of each run.

Configurations (``--configs``):

- ``base``: the base model, LoRA off, plain classifier-free guidance (w2 = 0).
- ``bundle``: the bundle's LoRA, expander and all its reward identifiers, original-prompt-centred guidance.
- ``bundle-no-expansion``: the bundle's LoRA with plain guidance (w2 = 0).

``--guidance-grid W1:W2,...`` evaluates ``bundle`` at each pair instead of once, labelled ``bundle@W1:W2``: the
paper's ablations are ``5:0`` (no expansion), ``0:5`` (no original-prompt guidance) and ``5:5``.

The image of a (prompt, seed) is the one ``pipe(prompt, generator=torch.Generator().manual_seed(seed))`` makes:
the expansion is drawn for each image with its own seed, so it does not depend on the batch.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from parrot_pipeline.bundle import DEFAULT_EXPANSION_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE
from parrot_pipeline.cli import (
    add_device_arguments,
    add_sampling_arguments,
    check_sampling_arguments,
    load_pipeline,
    resolve_device,
)

from .outputs import markdown_table, replacing, save_grid
from .prompts import read_prompts
from .rewards import REGISTRY, RewardFn, resolve_reward, score_images
from .sampling import adapters_disabled

CONFIGURATIONS = {
    "base": "base model, LoRA off, plain guidance",
    "bundle": "bundle's LoRA, expander and reward identifiers",
    "bundle-no-expansion": "bundle's LoRA, plain guidance",
}
SETTINGS_FILE = "run.json"
GRID_PROMPTS = 8  # rows of grid.png


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str  # a key of CONFIGURATIONS
    label: str  # the name, or bundle@W1:W2 for a point of the guidance grid
    guidance_scale: float | None  # None: the bundle's, else 5
    expansion_guidance_scale: float | None

    @property
    def lora(self) -> bool:
        return self.name != "base"

    @property
    def folder(self) -> str:
        return self.label.replace(":", "_")


@dataclasses.dataclass
class Evaluation:
    """Everything a run needs, checked before any model loads."""

    model: str | None
    bundle: str | None
    prompts_file: str
    prompts: list[str]
    seeds: int
    rewards: dict[str, RewardFn]
    reward_options: dict
    configurations: list[Configuration]
    steps: int
    height: int | None
    width: int | None
    batch_size: int
    device: str
    dtype: str
    output_dir: Path

    def settings(self) -> dict:
        """What the images and scores depend on: a run resumes only with the same settings (the batch size and the
        device may change)."""
        return {
            "model": self.model, "bundle": self.bundle, "prompts": self.prompts, "seeds": self.seeds,
            "rewards": list(self.rewards), "reward_options": self.reward_options,
            "configurations": [dataclasses.asdict(c) for c in self.configurations],
            "steps": self.steps, "height": self.height, "width": self.width, "dtype": self.dtype,
        }  # fmt: skip

    def items(self) -> list[tuple[int, int]]:
        """(prompt index, seed) of every image of one configuration."""
        return [(index, seed) for index in range(len(self.prompts)) for seed in range(self.seeds)]

    def record_path(self, configuration: Configuration, index: int, seed: int) -> Path:
        return self.output_dir / "images" / configuration.folder / f"{index:05d}-seed{seed}.json"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text!r}")
    return value


def guidance_grid(text: str) -> list[tuple[float, float]]:
    """``"5:0,5:5,7.5:2.5"`` → ``[(5.0, 0.0), (5.0, 5.0), (7.5, 2.5)]``."""
    pairs = []
    for item in text.split(","):
        try:
            w1, w2 = (non_negative_float(part) for part in item.split(":"))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a W1:W2 pair of guidance scales (finite numbers ≥ 0), e.g. 5:0,5:5,7.5:2.5"
            ) from None
        pairs.append((w1, w2))
    if len(set(pairs)) != len(pairs):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a pair")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Score a pipeline (and a Parrot bundle) on a prompt set with several rewards; writes "
        "results.csv, summary.md and grid.png. Run the same command again to resume an interrupted run.",
    )
    parser.add_argument("--model", help="base model: a diffusers folder or Hub id (default: the tiny embedded model)")
    parser.add_argument("--bundle", help="a Parrot bundle folder or Hub id (needed by the bundle configurations)")
    parser.add_argument(
        "--prompts", required=True,
        help="prompt file: .txt (one per line), .jsonl ('prompt' field), .tsv/.csv with a 'prompt', 'Prompt' "
        "(PartiPrompts) or 'Prompts' (DrawBench) column",
    )  # fmt: skip
    parser.add_argument("--max-prompts", type=positive_int, help="use only the first N prompts")
    parser.add_argument("--rewards", required=True, help="comma-separated reward names or module:function")
    parser.add_argument(
        "--reward-options",
        help='per reward, its options: a JSON object (\'{"clip_score": {"scale_100": true}}\') or a .json/.yaml file',
    )
    parser.add_argument("--seeds", type=positive_int, default=4, help="images per prompt, seeds 0..N-1 (default 4)")
    parser.add_argument(
        "--configs",
        help=f"comma-separated, from {list(CONFIGURATIONS)} (default: base,bundle with --bundle, else base)",
    )
    parser.add_argument(
        "--guidance-grid",
        type=guidance_grid,
        help="W1:W2,...: run the bundle configuration at each guidance_scale:expansion_guidance_scale pair, "
        "e.g. 5:0,0:5,5:5",
    )
    add_sampling_arguments(parser)  # --guidance-scale (all configurations), --expansion-guidance-scale (bundle)
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per pipeline call (default 4)")
    add_device_arguments(parser)
    parser.add_argument("--output-dir", type=Path, required=True, help="where the images and tables go")
    return parser


def read_reward_options(text: str | None, reward_names: list[str]) -> dict:
    """``--reward-options``: a JSON object, or a JSON or YAML file holding one."""
    if text is None:
        return {}
    if text.lstrip().startswith("{"):
        try:
            options = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--reward-options is not valid JSON: {error}.") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--reward-options {text!r} is neither a JSON object nor an existing .json/.yaml file.")
        try:
            options = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
        except yaml.YAMLError as error:
            raise ValueError(f"--reward-options file {text!r} is not valid YAML or JSON: {error}") from None
    if not isinstance(options, dict) or not all(isinstance(value, dict) for value in options.values()):
        raise ValueError(f"--reward-options must map reward names to option dicts, got {options!r}.")
    unknown = sorted(set(options) - set(reward_names))
    if unknown:
        raise ValueError(f"--reward-options names rewards {unknown} that are not in --rewards {reward_names}.")
    return options


def read_configurations(args: argparse.Namespace) -> list[Configuration]:
    names = [name.strip() for name in (args.configs or ("base,bundle" if args.bundle else "base")).split(",")]
    for name in names:
        if name not in CONFIGURATIONS:
            raise ValueError(f"--configs: unknown configuration {name!r}; use names from {list(CONFIGURATIONS)}.")
        if name.startswith("bundle") and not args.bundle:
            raise ValueError(f"--configs: configuration {name!r} needs --bundle.")
    if len(set(names)) != len(names):
        raise ValueError(f"--configs repeats a configuration: {names}.")
    if args.guidance_grid and "bundle" not in names:
        raise ValueError("--guidance-grid runs the 'bundle' configuration at each pair; add 'bundle' to --configs.")
    if args.expansion_guidance_scale is not None and ("bundle" not in names or args.guidance_grid):
        raise ValueError(
            "--expansion-guidance-scale sets w2 of the 'bundle' configuration: it needs 'bundle' in --configs and "
            "no --guidance-grid (whose pairs set w2)."
        )
    configurations = []
    for name in names:
        if name == "bundle" and args.guidance_grid:
            configurations += [Configuration(name, f"{name}@{w1:g}:{w2:g}", w1, w2) for w1, w2 in args.guidance_grid]
        elif name == "bundle":
            configurations.append(Configuration(name, name, args.guidance_scale, args.expansion_guidance_scale))
        else:
            configurations.append(Configuration(name, name, args.guidance_scale, 0.0))
    return configurations


def prepare(args: argparse.Namespace) -> Evaluation:
    """Check every argument and the output folder; loads no model and writes nothing."""
    prompts = read_prompts(args.prompts)[: args.max_prompts]
    reward_names = [name.strip() for name in args.rewards.split(",")]
    if not all(reward_names) or len(set(reward_names)) != len(reward_names):
        raise ValueError(f"--rewards must list distinct reward names separated by commas, got {args.rewards!r}.")
    options = read_reward_options(args.reward_options, reward_names)
    rewards = {name: resolve_reward(name, options.get(name)) for name in reward_names}
    check_sampling_arguments(args)
    evaluation = Evaluation(
        model=args.model, bundle=args.bundle, prompts_file=args.prompts, prompts=prompts, seeds=args.seeds,
        rewards=rewards, reward_options=options, configurations=read_configurations(args), steps=args.steps,
        height=args.height, width=args.width, batch_size=args.batch_size, device=resolve_device(args.device),
        dtype=args.dtype, output_dir=args.output_dir,
    )  # fmt: skip
    check_output_dir(evaluation)
    return evaluation


def check_output_dir(evaluation: Evaluation) -> None:
    """A new or empty folder, or one holding a run with the same settings (which then resumes)."""
    folder = evaluation.output_dir
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"--output-dir {str(folder)!r} is a file; give a folder.")
    settings_path = folder / SETTINGS_FILE
    if not settings_path.is_file():
        if any(folder.iterdir()):
            raise ValueError(
                f"--output-dir {str(folder)!r} is not empty and holds no evaluation ({SETTINGS_FILE}); choose a new "
                "or empty folder."
            )
        return
    saved = json.loads(settings_path.read_text(encoding="utf-8"))
    current = json.loads(json.dumps(evaluation.settings()))  # as JSON would give it back
    changed = [key for key in current if saved.get(key) != current[key]]
    if changed:
        raise ValueError(
            f"--output-dir {str(folder)!r} holds an evaluation with other settings ({', '.join(changed)} differ); "
            "resume it with the same arguments or choose another --output-dir."
        )


def main(argv: list[str] | None = None) -> int:
    return command(build_parser(), prepare, run, argv)


def command(parser: argparse.ArgumentParser, prepare, run, argv: list[str] | None) -> int:
    """An evaluation command: ``run(prepare(args))`` printed; bad input exits with 2, Ctrl-C with 130 (the images
    kept in ``--output-dir``, so the same command resumes)."""
    args = parser.parse_args(argv)
    try:
        evaluation = prepare(args)
        print(run(evaluation))
    except (ValueError, TypeError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ninterrupted: the images made so far are kept in {args.output_dir}; run the same command "
                         "to resume.\n")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Generation and scoring


def guidance_scales(pipe, configuration: Configuration) -> tuple[float, float]:
    """The configuration's (w1, w2), with the pipeline's defaults (the loaded bundle's, else 5) for unset ones."""
    bundle = pipe.parrot_config
    w1 = configuration.guidance_scale
    w2 = configuration.expansion_guidance_scale
    if w1 is None:
        w1 = bundle.guidance_scale if bundle else DEFAULT_GUIDANCE_SCALE
    if w2 is None:
        w2 = bundle.expansion_guidance_scale if bundle else DEFAULT_EXPANSION_GUIDANCE_SCALE
    return w1, w2


def generate_and_score(
    evaluation: Evaluation, pipe, configuration: Configuration, items: list[tuple[int, int]], expansions: dict
) -> list[dict]:
    """Images of one batch, saved as PNG, scored as saved (8-bit); returns their records."""
    prompts = [evaluation.prompts[index] for index, _ in items]
    w1, w2 = guidance_scales(pipe, configuration)
    expanded = None
    if w2 > 0 and pipe.expander is not None:  # what the pipeline would draw for each image alone, with its seed
        for index, seed in items:
            if (index, seed) not in expansions:
                expansions[index, seed] = pipe.expand_prompts([evaluation.prompts[index]], seed=seed)[0]
        expanded = [expansions[item] for item in items]
    lora_off = adapters_disabled(pipe.unet) if pipe.parrot_config and not configuration.lora else nullcontext()
    with lora_off:
        out = pipe(
            prompts, expanded_prompt=expanded, guidance_scale=w1, expansion_guidance_scale=w2,
            num_inference_steps=evaluation.steps, height=evaluation.height, width=evaluation.width,
            generator=[torch.Generator().manual_seed(seed) for _, seed in items],
        )  # fmt: skip
    texts = out.expanded_prompts or prompts
    images = torch.stack([pil_to_tensor(image) for image in out.images]).float() / 255
    scores = score_images(evaluation.rewards, images, prompts, {"original_prompts": prompts, "expanded_prompts": texts})
    records = []
    for (index, seed), image, text, row in zip(items, out.images, out.expanded_prompts or [""] * len(items), scores):
        path = evaluation.record_path(configuration, index, seed)
        with replacing(path.with_suffix(".png")) as temporary:
            image.save(temporary, format="PNG")
        record = {
            "configuration": configuration.label, "guidance_scale": w1, "expansion_guidance_scale": w2,
            "prompt_index": index, "prompt": evaluation.prompts[index], "seed": seed, "expanded_prompt": text,
            "image": path.with_suffix(".png").relative_to(evaluation.output_dir).as_posix(),
            "rewards": dict(zip(evaluation.rewards, row.tolist())),
        }  # fmt: skip
        with replacing(path) as temporary:
            temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        records.append(record)
    return records


def run(evaluation: Evaluation) -> str:
    """Generate and score every image without a record, then write the tables and the grid; returns the summary."""
    records = {}
    pending = []
    for configuration in evaluation.configurations:
        for index, seed in evaluation.items():
            path = evaluation.record_path(configuration, index, seed)
            if path.is_file():
                records[configuration.label, index, seed] = json.loads(path.read_text(encoding="utf-8"))
            else:
                pending.append((configuration, index, seed))

    if pending:
        pipe = load_pipeline(
            evaluation.model, evaluation.bundle, evaluation.device, evaluation.dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        evaluation.output_dir.mkdir(parents=True, exist_ok=True)
        with replacing(evaluation.output_dir / SETTINGS_FILE) as temporary:
            temporary.write_text(json.dumps(evaluation.settings(), indent=2) + "\n", encoding="utf-8")
        expansions: dict[tuple[int, int], str] = {}
        progress = tqdm(total=len(records) + len(pending), initial=len(records), desc="evaluate", unit="image")
        with progress:
            for configuration in evaluation.configurations:
                items = [(index, seed) for c, index, seed in pending if c == configuration]
                progress.set_postfix(configuration=configuration.label)
                for start in range(0, len(items), evaluation.batch_size):
                    batch = items[start : start + evaluation.batch_size]
                    for record in generate_and_score(evaluation, pipe, configuration, batch, expansions):
                        records[configuration.label, record["prompt_index"], record["seed"]] = record
                    progress.update(len(batch))

    ordered = [
        records[configuration.label, index, seed]
        for configuration in evaluation.configurations
        for index, seed in evaluation.items()
    ]
    write_results_csv(ordered, list(evaluation.rewards), evaluation.output_dir / "results.csv")
    summary = summary_markdown(evaluation, ordered)
    with replacing(evaluation.output_dir / "summary.md") as temporary:
        temporary.write_text(summary, encoding="utf-8")
    write_grid(evaluation, evaluation.output_dir / "grid.png")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def write_results_csv(records: list[dict], reward_names: list[str], path: Path) -> None:
    columns = ["configuration", "guidance_scale", "expansion_guidance_scale", "prompt_index", "prompt", "seed",
               "expanded_prompt", "image"]  # fmt: skip
    with replacing(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns + reward_names)
        for record in records:
            writer.writerow([record[column] for column in columns] + [record["rewards"][n] for n in reward_names])


def higher_is_better(reward_name: str) -> bool:
    """As the registry states it; a user's ``module:function`` follows the reward protocol (higher is better)."""
    return REGISTRY[reward_name].higher_is_better if reward_name in REGISTRY else True


def reward_statistics(records: list[dict], reward_names: list[str]) -> dict:
    """Per reward and configuration: the mean and standard error over the finite values, and the win rate against
    ``base`` (when evaluated) on the same (prompt, seed) pairs; ties count one half, pairs with a non-finite value
    are left out."""
    labels = list(dict.fromkeys(record["configuration"] for record in records))
    statistics = {}
    for name in reward_names:
        better = higher_is_better(name)
        values = {label: {} for label in labels}
        for record in records:
            values[record["configuration"]][record["prompt_index"], record["seed"]] = record["rewards"][name]
        statistics[name] = {}
        for label in labels:
            finite = torch.tensor([v for v in values[label].values() if math.isfinite(v)], dtype=torch.float64)
            entry = {"mean": finite.mean().item(), "standard_error": (finite.std() / len(finite) ** 0.5).item(),
                     "n": len(finite)}  # fmt: skip
            if "base" in values and label != "base":
                base = values["base"]
                pairs = [(v, base[key]) for key, v in values[label].items()
                         if key in base and math.isfinite(v) and math.isfinite(base[key])]  # fmt: skip
                wins = sum((v > b) if better else (v < b) for v, b in pairs) + 0.5 * sum(v == b for v, b in pairs)
                entry["win_rate"] = wins / len(pairs) if pairs else math.nan
                entry["pairs"] = len(pairs)
            statistics[name][label] = entry
    return statistics


def summary_markdown(evaluation: Evaluation, records: list[dict]) -> str:
    reward_names = list(evaluation.rewards)
    statistics = reward_statistics(records, reward_names)
    first = {}
    for record in records:
        first.setdefault(record["configuration"], record)
    scales = [
        [c.label, CONFIGURATIONS[c.name], f"{first[c.label]['guidance_scale']:g}",
         f"{first[c.label]['expansion_guidance_scale']:g}"]
        for c in evaluation.configurations
    ]  # fmt: skip
    width, height = Image.open(evaluation.output_dir / records[0]["image"]).size
    lines = [
        "# Evaluation",
        "",
        f"- model: {evaluation.model or 'the tiny embedded model'}; bundle: {evaluation.bundle or 'none'}",
        f"- prompts: {Path(evaluation.prompts_file).name}, {len(evaluation.prompts)} prompts × {evaluation.seeds} "
        f"seeds (0..{evaluation.seeds - 1}); {evaluation.steps} steps, {width}×{height}, {evaluation.dtype}",
        "",
        markdown_table(["configuration", "what", "guidance_scale (w1)", "expansion_guidance_scale (w2)"], scales),
    ]
    for name in reward_names:
        direction = "higher" if higher_is_better(name) else "lower"
        rows = []
        for label, entry in statistics[name].items():
            win = f"{100 * entry['win_rate']:.1f}% of {entry['pairs']}" if "win_rate" in entry else "—"
            rows.append([label, f"{entry['mean']:.4g} ± {entry['standard_error']:.2g}", str(entry["n"]), win])
        table = markdown_table(["configuration", "mean ± standard error", "n", "win rate vs base"], rows)
        lines += ["", f"## {name} ({direction} is better)", "", table]
    lines += [
        "",
        "Win rate: the share of (prompt, seed) pairs on which the configuration scores better than `base` on the "
        "same prompt and seed; ties count one half. Non-finite values are left out.",
        "",
        f"`grid.png`: the first {min(GRID_PROMPTS, len(evaluation.prompts))} prompts (rows), seed 0, one column per "
        "configuration in the order of the first table.",
    ]
    return "\n".join(lines) + "\n"


def write_grid(evaluation: Evaluation, path: Path) -> None:
    images = [
        pil_to_tensor(Image.open(evaluation.record_path(configuration, index, 0).with_suffix(".png")).convert("RGB"))
        for index in range(min(GRID_PROMPTS, len(evaluation.prompts)))
        for configuration in evaluation.configurations
    ]
    with replacing(path) as temporary:
        save_grid(torch.stack(images).float() / 255, temporary, columns=len(evaluation.configurations))


if __name__ == "__main__":
    sys.exit(main())
