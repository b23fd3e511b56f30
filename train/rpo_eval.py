"""``python -m train.rpo_eval``: DreamBench-style evaluation of subject-driven models (RPO runs, and the base model).

Data in DreamBench's layout (the ``dataset/`` folder of github.com/google/dreambooth): one folder of reference
images per subject and ``prompts_and_classes.txt`` with the subjects' classes (a ``subject_name,class`` table) and
the prompt templates for objects and for live subjects (``'a {0} {1} in the jungle'.format(unique_token,
class_token)``); cats and dogs are the live subjects (``--live-classes``).

For each subject, configuration and prompt, ``--images-per-prompt`` images are drawn (seeds 0..N−1) and scored as
saved (8-bit PNG) by DreamBench's three metrics, the backbones of the RPO paper's protocol:

- DINO: the mean cosine of DINO ViT-S/16 [CLS] embeddings between generated and reference images (all pairs);
- CLIP-I: the same with CLIP ViT-B/16 image embeddings;
- CLIP-T: the cosine of the CLIP ViT-B/16 image and prompt embeddings (identifier removed), floored at 0
  (CLIPScore / 100).

Configurations: ``base`` (the base model, given the same prompts with the identifier) and ``rpo`` (each subject's
RPO run: ``--runs DIR`` holds one output_dir per subject, named as the subject's folder, with its ``bundle/`` or,
for a whole-UNet run, its ``model/``). Subjects are averaged with equal weight. Interrupted, the same command
resumes: images already saved are not drawn again.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from parrot_pipeline import ParrotConfig
from parrot_pipeline.bundle import CONFIG_NAME
from parrot_pipeline.cli import add_device_arguments, load_pipeline, resolve_device

from .evaluate import SETTINGS_FILE, check_output_dir, command, non_negative_float, positive_int
from .outputs import markdown_table, replacing
from .rewards.dino import DEFAULT_MODEL as DINO_MODEL
from .rewards.dino import DinoSimilarity
from .rewards.lambda_harmonic import dual_encoder, remove_identifier
from .rewards.references import read_image, read_subject_images
from .sampling import adapters_disabled

CLIP_MODEL = "openai/clip-vit-base-patch16"  # CLIP-I and CLIP-T in the RPO paper's protocol
PROMPTS_FILE = "prompts_and_classes.txt"
CONFIGURATIONS = ("base", "rpo")
METRICS = ("dino", "clip_i", "clip_t")
# The RPO paper's DreamBench averages (SD 2.1 base, λ-harmonic validation at λ), for the summary's reference rows.
PAPER = {0.3: (0.581, 0.798, 0.329), 0.5: (0.652, 0.833, 0.314), 0.7: (0.679, 0.850, 0.304)}
TEMPLATE = re.compile(r"""(['"])(.*?)\1\s*\.format\(""")


@dataclasses.dataclass
class Subject:
    name: str
    class_noun: str
    live: bool
    references: list  # PIL images
    run: Path | None  # the RPO run's bundle/ or model/ folder


@dataclasses.dataclass
class DreamBenchEvaluation:
    """Everything a run needs, checked before any model loads."""

    data: Path
    subjects: list[Subject]
    object_prompts: list[str]  # templates with {0} (identifier) and {1} (class noun)
    live_prompts: list[str]
    configurations: list[str]
    identifier: str  # the base model's identifier (rpo runs use their own)
    model: str | None
    images_per_prompt: int
    steps: int
    guidance_scale: float
    batch_size: int
    clip_model: str
    dino_model: str
    device: str
    dtype: str
    output_dir: Path

    def settings(self) -> dict:
        """What the images and scores depend on: a run resumes only with the same settings."""
        return {
            "data": str(self.data), "subjects": [s.name for s in self.subjects], "object_prompts": self.object_prompts,
            "live_prompts": self.live_prompts, "configurations": self.configurations, "identifier": self.identifier,
            "model": self.model, "runs": [str(s.run) for s in self.subjects], "images_per_prompt": self.images_per_prompt,
            "steps": self.steps, "guidance_scale": self.guidance_scale, "clip_model": self.clip_model,
            "dino_model": self.dino_model, "dtype": self.dtype,
        }  # fmt: skip

    def prompts(self, subject: Subject, identifier: str) -> list[str]:
        templates = self.live_prompts if subject.live else self.object_prompts
        return [template.format(identifier, subject.class_noun) for template in templates]

    def image_path(self, configuration: str, subject: Subject, index: int, seed: int) -> Path:
        return self.output_dir / "images" / configuration / subject.name / f"{index:03d}-seed{seed}.png"


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def read_prompts_and_classes(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """DreamBench's ``prompts_and_classes.txt``: ``{subject: class}``, the object and the live-subject templates."""
    if not path.is_file():
        raise ValueError(f"--data: {path} is missing; DreamBench's dataset folder has it (or pass --prompts-file).")
    text = path.read_text(encoding="utf-8")
    if "Object Prompts" not in text or "Live Subject Prompts" not in text or "subject_name,class" not in text:
        raise ValueError(
            f"{path}: not in DreamBench's format (a 'subject_name,class' table, then 'Object Prompts' and 'Live "
            "Subject Prompts' lists of 'a {0} {1} ...'.format(unique_token, class_token) lines)."
        )
    table, prompts = text.split("subject_name,class", 1)[1].split("Object Prompts", 1)
    classes = {}
    for line in table.splitlines():
        if "," in line:
            name, noun = (part.strip() for part in line.split(",", 1))
            classes[name] = noun
    objects, live = prompts.split("Live Subject Prompts", 1)
    object_prompts, live_prompts = ([m.group(2) for m in TEMPLATE.finditer(part)] for part in (objects, live))
    for name, templates in (("Object Prompts", object_prompts), ("Live Subject Prompts", live_prompts)):
        if not templates or not all("{0}" in t and "{1}" in t for t in templates):
            raise ValueError(f"{path}: the {name} list must hold templates with {{0}} (identifier) and {{1}} (class).")
    return classes, object_prompts, live_prompts


def run_folder(runs: Path, name: str) -> Path:
    """The result of a subject's RPO run: ``<runs>/<subject>/bundle`` (LoRA) or ``/model`` (whole UNet)."""
    for kind in ("bundle", "model"):
        if (runs / name / kind / CONFIG_NAME).is_file():
            return runs / name / kind
    raise ValueError(f"--runs: {runs / name} holds no RPO result (a bundle/ or model/ folder with {CONFIG_NAME}).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.rpo_eval",
        description="DreamBench evaluation (DINO, CLIP-I, CLIP-T) of RPO runs and the base model; writes results.csv "
        "and summary.md. Run the same command again to resume an interrupted run.",
    )
    parser.add_argument("--data", type=Path, required=True, help="DreamBench's dataset folder: one folder per subject")
    parser.add_argument("--prompts-file", type=Path, help=f"default: DATA/{PROMPTS_FILE}")
    parser.add_argument("--subjects", help="comma-separated subject folders (default: every subject of the table)")
    parser.add_argument("--live-classes", default="cat,dog", help="classes with the live-subject prompts (cat,dog)")
    parser.add_argument("--runs", type=Path, help="one RPO output_dir per subject, named as its folder (for 'rpo')")
    parser.add_argument("--configs", help=f"comma-separated from {list(CONFIGURATIONS)} (default: rpo with --runs, else base)")
    parser.add_argument("--identifier", default="sks", help="the identifier in the base model's prompts (sks)")
    parser.add_argument("--model", help="base model folder or Hub id (default: the tiny embedded model)")
    parser.add_argument("--max-prompts", type=positive_int, help="only the first N prompts of each list")
    parser.add_argument("--images-per-prompt", type=positive_int, default=4, help="seeds 0..N-1 (default 4)")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=non_negative_float, default=7.5, help="default 7.5")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per pipeline call (default 4)")
    parser.add_argument("--clip-model", default=CLIP_MODEL, help=f"CLIP-I and CLIP-T backbone ({CLIP_MODEL})")
    parser.add_argument("--dino-model", default=DINO_MODEL, help=f"DINO backbone ({DINO_MODEL})")
    add_device_arguments(parser)
    parser.add_argument("--output-dir", type=Path, required=True, help="where the images and tables go")
    return parser


def prepare(args: argparse.Namespace) -> DreamBenchEvaluation:
    """Check every argument, read the prompts and every reference image; loads no model and writes nothing."""
    classes, object_prompts, live_prompts = read_prompts_and_classes(args.prompts_file or args.data / PROMPTS_FILE)
    configurations = [c.strip() for c in (args.configs or ("rpo" if args.runs else "base")).split(",")]
    for name in configurations:
        if name not in CONFIGURATIONS:
            raise ValueError(f"--configs: unknown configuration {name!r}; use names from {list(CONFIGURATIONS)}.")
    if len(set(configurations)) != len(configurations):
        raise ValueError(f"--configs repeats a configuration: {configurations}.")
    if "rpo" in configurations and args.runs is None:
        raise ValueError("--configs: 'rpo' needs --runs, the folder of the subjects' RPO runs.")
    names = [n.strip() for n in args.subjects.split(",")] if args.subjects else list(classes)
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ValueError(f"--subjects: {unknown} are not in the subject table of the prompts file ({sorted(classes)}).")
    live_classes = {c.strip() for c in args.live_classes.split(",")}
    subjects = [
        Subject(name, classes[name], classes[name] in live_classes,
                read_subject_images(args.data / name, f"--data subject {name!r}"),
                run_folder(args.runs, name) if "rpo" in configurations else None)
        for name in names
    ]  # fmt: skip
    evaluation = DreamBenchEvaluation(
        data=args.data, subjects=subjects, object_prompts=object_prompts[: args.max_prompts],
        live_prompts=live_prompts[: args.max_prompts], configurations=configurations, identifier=args.identifier,
        model=args.model, images_per_prompt=args.images_per_prompt, steps=args.steps,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size, clip_model=args.clip_model,
        dino_model=args.dino_model, device=resolve_device(args.device), dtype=args.dtype, output_dir=args.output_dir,
    )  # fmt: skip
    check_output_dir(evaluation)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    return command(build_parser(), prepare, run, argv)


# ----------------------------------------------------------------------------------------------------------------
# Generation and scoring


def subject_identifier(evaluation: DreamBenchEvaluation, configuration: str, subject: Subject) -> str:
    if configuration == "rpo":
        return ParrotConfig.load(subject.run / CONFIG_NAME).extra["identifier"]
    return evaluation.identifier


def generate(evaluation: DreamBenchEvaluation) -> None:
    """Draw and save every image that is not saved yet."""
    pending = [
        (configuration, subject, index, seed)
        for subject in evaluation.subjects
        for configuration in evaluation.configurations
        for index in range(len(evaluation.prompts(subject, "")))
        for seed in range(evaluation.images_per_prompt)
        if not evaluation.image_path(configuration, subject, index, seed).is_file()
    ]
    if not pending:
        return
    evaluation.output_dir.mkdir(parents=True, exist_ok=True)
    with replacing(evaluation.output_dir / SETTINGS_FILE) as temporary:
        temporary.write_text(json.dumps(evaluation.settings(), indent=2) + "\n", encoding="utf-8")
    pipe = load_pipeline(evaluation.model, None, evaluation.device, evaluation.dtype,
                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    progress = tqdm(total=len(pending), desc="dreambench", unit="image")
    for subject in evaluation.subjects:
        for configuration in evaluation.configurations:
            items = [(index, seed) for c, s, index, seed in pending if c == configuration and s is subject]
            if not items:
                continue
            model = pipe
            if configuration == "rpo" and subject.run.name == "model":  # a whole fine-tuned UNet: its own pipeline
                model = load_pipeline(str(subject.run), None, evaluation.device, evaluation.dtype,
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
                model.set_progress_bar_config(disable=True)
            elif configuration == "rpo":
                pipe.load_parrot_weights(subject.run)
            base = configuration == "base" and pipe.parrot_config is not None
            prompts = evaluation.prompts(subject, subject_identifier(evaluation, configuration, subject))
            progress.set_postfix(subject=subject.name, configuration=configuration)
            for start in range(0, len(items), evaluation.batch_size):
                batch = items[start : start + evaluation.batch_size]
                with adapters_disabled(pipe.unet) if base else nullcontext():
                    out = model(
                        [prompts[index] for index, _ in batch], guidance_scale=evaluation.guidance_scale,
                        expansion_guidance_scale=0.0, num_inference_steps=evaluation.steps,
                        generator=[torch.Generator().manual_seed(seed) for _, seed in batch],
                    )  # fmt: skip
                for (index, seed), image in zip(batch, out.images):
                    with replacing(evaluation.image_path(configuration, subject, index, seed)) as temporary:
                        image.save(temporary, format="PNG")
                progress.update(len(batch))
    progress.close()


@torch.no_grad()
def score(evaluation: DreamBenchEvaluation) -> list[dict]:
    """DINO, CLIP-I and CLIP-T of every subject and configuration, from the saved images."""
    clip = dual_encoder(evaluation.clip_model, evaluation.device, "fp32")
    dino = DinoSimilarity(model=evaluation.dino_model, device=evaluation.device)
    rows = []
    for subject in evaluation.subjects:
        references = [pil_to_tensor(image)[None].float() / 255 for image in subject.references]  # any sizes
        clip_references = torch.cat([clip.image_features(image) for image in references])
        dino_references = torch.cat([dino.image_features(image) for image in references])
        for configuration in evaluation.configurations:
            identifier = subject_identifier(evaluation, configuration, subject)
            prompts = evaluation.prompts(subject, identifier)
            items = [(index, seed) for index in range(len(prompts)) for seed in range(evaluation.images_per_prompt)]
            images = torch.stack([pil_to_tensor(read_image(evaluation.image_path(configuration, subject, i, s)))
                                  for i, s in items]).float() / 255  # fmt: skip
            clip_images = clip.image_features(images)
            texts = clip.text_features([remove_identifier(prompts[index], identifier) for index, _ in items])
            rows.append({
                "configuration": configuration, "subject": subject.name, "class": subject.class_noun,
                "live": subject.live, "identifier": identifier, "images": len(items),
                "dino": (dino.image_features(images) @ dino_references.T).mean().item(),
                "clip_i": (clip_images @ clip_references.T).mean().item(),
                "clip_t": (clip_images * texts).sum(dim=-1).clamp(min=0).mean().item(),
            })  # fmt: skip
    return rows


def run(evaluation: DreamBenchEvaluation) -> str:
    generate(evaluation)
    rows = score(evaluation)
    columns = ["configuration", "subject", "class", "live", "identifier", "images", *METRICS]
    with replacing(evaluation.output_dir / "results.csv") as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    summary = summary_markdown(evaluation, rows)
    with replacing(evaluation.output_dir / "summary.md") as temporary:
        temporary.write_text(summary, encoding="utf-8")
    return summary


def averages(rows: list[dict], configuration: str) -> list[float]:
    """Each metric's mean over the configuration's subjects (equal weight per subject)."""
    mine = [row for row in rows if row["configuration"] == configuration]
    return [sum(row[metric] for row in mine) / len(mine) for metric in METRICS]


def summary_markdown(evaluation: DreamBenchEvaluation, rows: list[dict]) -> str:
    header = ["configuration", "DINO", "CLIP-I", "CLIP-T"]
    means = [[c, *(f"{v:.3f}" for v in averages(rows, c))] for c in evaluation.configurations]
    paper = [[f"RPO paper, λ = {lam} (SD 2.1)", *(f"{v:.3f}" for v in values)] for lam, values in PAPER.items()]
    per_subject = [[row["configuration"], row["subject"], row["class"], "live" if row["live"] else "object",
                    *(f"{row[m]:.3f}" for m in METRICS)] for row in rows]  # fmt: skip
    prompts = len(evaluation.object_prompts)
    return "\n".join([
        "# DreamBench evaluation",
        "",
        f"- {len(evaluation.subjects)} subjects from {evaluation.data}; {prompts} prompts each (object or live list) "
        f"× {evaluation.images_per_prompt} seeds; {evaluation.steps} steps, guidance {evaluation.guidance_scale:g}",
        f"- model: {evaluation.model or 'the tiny embedded model'}; DINO {evaluation.dino_model}, CLIP "
        f"{evaluation.clip_model}",
        "",
        "## Averages over subjects",
        "",
        markdown_table(header, means + paper),
        "",
        "## Per subject",
        "",
        markdown_table(["configuration", "subject", "class", "prompts", "DINO", "CLIP-I", "CLIP-T"], per_subject),
        "",
        "DINO and CLIP-I: mean cosine over all (generated, reference) pairs; CLIP-T: image–prompt cosine with the "
        "identifier removed, floored at 0.",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
