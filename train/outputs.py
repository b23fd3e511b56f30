"""What a run writes: the metrics JSONL, sample grids, reward curves, the Pareto-front plot, the final table."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from .pareto import non_dominated_mask  # noqa: E402


class MetricsWriter:
    """Appends one JSON object per iteration; each line is flushed so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file with ``records`` (a resumed run drops the iterations after its checkpoint)."""
        partial = self.path.with_suffix(".tmp")
        partial.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        partial.replace(self.path)


@contextmanager
def replacing(path: Path):
    """Yield a temporary path next to ``path`` that replaces ``path`` when the block succeeds, so a reader or an
    interrupted run never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".partial-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=columns, padding=2)


def plot_rewards(history: list[dict], reward_names: list[str], path: Path) -> None:
    """Each reward's batch mean per iteration, with a moving average."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(reward_names), figsize=(4 * len(reward_names), 3.2), squeeze=False)
    iterations = [record["iteration"] for record in history]
    for axis, name in zip(axes[0], reward_names):
        values = [record[f"reward/{name}"] for record in history]
        window = max(1, len(values) // 10)
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                  for i in range(len(values))]  # fmt: skip
        axis.plot(iterations, values, alpha=0.35, label="batch mean")
        axis.plot(iterations, smooth, label=f"moving average ({window})")
        axis.set_title(name)
        axis.set_xlabel("iteration")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(batches: dict[str, tuple[torch.Tensor, torch.Tensor]], reward_names: list[str], path: Path) -> None:
    """Reward vectors of the first and last iteration's batches with their non-dominated fronts.

    One panel per pair of rewards (K > 2 gives the pairwise panels); the front drawn is the one of that pair.
    With a single reward (dpok/ddpo), the two batches' reward histograms.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(reward_names) == 1:  # a single reward has no front to draw: compare the two batches' distributions
        figure, axis = plt.subplots(figsize=(4.2, 3.4))
        for label, (rewards, _) in batches.items():
            values = rewards[:, 0][torch.isfinite(rewards[:, 0])]
            axis.hist(values.numpy(), bins=12, alpha=0.5, label=f"{label} iteration")
        axis.set_xlabel(reward_names[0])
        axis.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return
    pairs = [(i, j) for i in range(len(reward_names)) for j in range(i + 1, len(reward_names))]
    figure, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    for axis, (i, j) in zip(axes[0], pairs):
        for label, (rewards, _), colour in zip(batches, batches.values(), ("tab:blue", "tab:orange")):
            points = rewards[:, [i, j]]
            points = points[torch.isfinite(points).all(dim=1)]
            front = points[non_dominated_mask(points)]
            front = front[torch.argsort(front[:, 0])]
            axis.scatter(points[:, 0], points[:, 1], s=12, alpha=0.5, color=colour, label=f"{label} iteration")
            axis.plot(front[:, 0], front[:, 1], "-o", ms=4, color=colour, label=f"{label} front")
        axis.set_xlabel(reward_names[i])
        axis.set_ylabel(reward_names[j])
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_validation(validations: list[dict], series: dict[str, str], selected: int, path: Path,
                    x_key: str = "iteration") -> None:  # fmt: skip
    """One panel per validation score (``series``: title → record key) over the run, the first validation (the model
    before training) as a dotted line, the selected iterate as a dashed one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [record[x_key] for record in validations]
    figure, axes = plt.subplots(1, len(series), figsize=(3.8 * len(series), 3.2), squeeze=False)
    for axis, (title, key) in zip(axes[0], series.items()):
        axis.plot(x, [record[key] for record in validations], "-o", ms=3)
        axis.axhline(validations[0][key], color="gray", linestyle=":", label="before training")
        axis.axvline(selected, color="tab:red", linestyle="--", label=f"selected ({x_key} {selected})")
        axis.set_title(title)
        axis.set_xlabel(x_key)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


CARD_SETTINGS = ("mode", "iterations", "images_per_prompt", "resolution", "num_inference_steps", "guidance_scale",
                 "eta", "learning_rate", "lr_scheduler", "lora_rank", "lora_targets", "advantage", "kl_beta", "clip_range",
                 "expander_model", "expander_learning_rate", "freeze_expander", "train_unet", "seed")  # fmt: skip


def model_card_sections(config, results: dict) -> str:
    """The training run's part of the bundle's model card: the main settings, the validation curve with the selected
    iterate, and the final evaluation."""
    settings = "\n".join(f"| `{name}` | `{getattr(config, name)}` |" for name in CARD_SETTINGS)
    return f"""## Training

| setting | value |
|---|---|
{settings}
{validation_section(config, results)}
## Evaluation on held-out prompts

{config.eval_images_per_prompt} images for each held-out prompt, base model (plain guidance, no LoRA) against the
trained model (expansion, identifiers and original-prompt-centred guidance with
`expansion_guidance_scale` = {config.eval_expansion_guidance_scale}), both sampled with the trained sampler: DDIM,
{config.num_inference_steps} steps, deterministic (eta 0).

{evaluation_table(results, config.rewards)}
"""


SELECTION_RULES = {
    "hypervolume": "the fewest rewards below the base model, then the highest hypervolume",
    "last": "the last iterate",
}


def validation_section(config, results: dict) -> str:
    """The card's validation curve: every validation, which iterate the bundle is and why."""
    selection = results.get("selection")
    if selection is None:
        return ""
    rule = SELECTION_RULES.get(selection["select_by"], f"the highest mean {selection['select_by']}")
    names = list(config.rewards) + (["hypervolume"] if len(config.rewards) > 1 else [])
    rows = []
    for record in selection["validations"]:
        label = "base" if record["iteration"] == 0 else str(record["iteration"])
        marks = (["**bundle**"] if record["iteration"] == selection["iteration"] and record["iteration"] else [])
        marks += [f"collapsed: {', '.join(record['collapsed'])}"] if record.get("collapsed") else []
        marks += [f"rolled back to {record['rolled_back_to']}"] if "rolled_back_to" in record else []
        rows.append([label, *(f"{record[f'validation/{name}']:.4g}" for name in names), "; ".join(marks)])
    stopped = {None: "", "patience": f" The run stopped early: {config.patience} validations without a new best.",
               "collapse": " The run stopped when a reward collapsed."}[selection["stopped_by"]]  # fmt: skip
    return f"""
## Validation

Every {config.validate_every} iterations, {config.validation_images_per_prompt} images for each validation prompt
(not the held-out prompts below), fixed seeds; the hypervolume uses the base model's validation as its scale. This
bundle is iteration {selection["iteration"]} of {selection["last_iteration"]}, selected by {rule}.{stopped}

{markdown_table(["iteration", *names, ""], rows)}
"""


def evaluation_table(results: dict, reward_names: list[str]) -> str:
    """The final held-out comparison as a Markdown table: the base model, the bundle's iterate and, when it is not
    the last, the last iterate."""
    labels = {"base": "base", "trained": "trained", "last": "last"}
    if "iteration" in results["trained"]:
        labels["trained"] = f"trained (iteration {results['trained']['iteration']}, the bundle)"
    if "last" in results:
        labels["last"] = f"last (iteration {results['last']['iteration']})"
    rows = [
        [labels[label], *(f"{results[label]['means'][name]:.4g}" for name in reward_names),
         f"{results[label]['hypervolume']:.4f}"]
        for label in labels if label in results
    ]  # fmt: skip
    gain = results["trained"]["hypervolume"] - results["base"]["hypervolume"]
    sign = "+" if gain >= 0 else ""
    table = markdown_table(["model", *reward_names, "hypervolume"], rows)
    return "\n".join([table, f"\nhypervolume gain (trained − base): {sign}{gain:.4f}"]) + (
        "" if math.isfinite(gain) else "\n(non-finite: some rewards were not finite)"
    )
