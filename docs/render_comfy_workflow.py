"""Draw example_workflows/parrot_sd15.json as a graph picture (docs/comfy_workflow.png) for the README.

The nodes are drawn where the workflow file places them, with their titles and widget values, and one line per
link coloured by type, the way ComfyUI shows the graph. Run: python docs/render_comfy_workflow.py
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, PathPatch  # noqa: E402
from matplotlib.path import Path as CurvePath  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPE_COLOURS = {
    "MODEL": "#b39ddb", "CLIP": "#ffd54f", "VAE": "#ef9a9a", "CONDITIONING": "#ffb74d", "LATENT": "#f48fb1",
    "IMAGE": "#80cbc4", "STRING": "#a5d6a7", "PARROT_EXPANDER": "#4fc3f7", "GUIDER": "#90caf9", "NOISE": "#bdbdbd",
    "SAMPLER": "#e6ee9c", "SIGMAS": "#cfd8dc",
}  # fmt: skip
HEADER = 26


def slot_y(node: dict, index: int) -> float:
    return node["pos"][1] + HEADER + 14 + 20 * index


def main() -> None:
    workflow = json.loads((ROOT / "example_workflows" / "parrot_sd15.json").read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    fig, ax = plt.subplots(figsize=(20, 6.4), dpi=110)
    fig.patch.set_facecolor("#202020")
    ax.set_facecolor("#202020")
    for _, source, source_slot, target, target_slot, kind in workflow["links"]:
        start = (nodes[source]["pos"][0] + nodes[source]["size"][0], slot_y(nodes[source], source_slot))
        end = (nodes[target]["pos"][0], slot_y(nodes[target], target_slot))
        bend = max(40.0, (end[0] - start[0]) / 2)
        curve = CurvePath(
            [start, (start[0] + bend, start[1]), (end[0] - bend, end[1]), end],
            [CurvePath.MOVETO, CurvePath.CURVE4, CurvePath.CURVE4, CurvePath.CURVE4],
        )
        ax.add_patch(PathPatch(curve, fill=False, lw=2, color=TYPE_COLOURS.get(kind, "#ffffff"), alpha=0.9, zorder=1))
    for node in nodes.values():
        (x, y), (width, height) = node["pos"], node["size"]
        parrot = node["type"].startswith("Parrot")
        ax.add_patch(
            FancyBboxPatch(
                (x, y), width, height + HEADER, boxstyle="round,pad=0,rounding_size=8", zorder=2,
                facecolor="#2f3d52" if parrot else "#353535", edgecolor="#4fc3f7" if parrot else "#555555", lw=1.5,
            )
        )  # fmt: skip
        ax.text(x + 10, y + 17, node["title"], color="white", fontsize=8.5, weight="bold", zorder=3)
        for index, output in enumerate(node["outputs"]):
            ax.text(x + width - 10, slot_y(node, index) + 4, output["name"], color="#cccccc", fontsize=7.5,
                    ha="right", zorder=3)  # fmt: skip
        for index, entry in enumerate(node["inputs"]):
            ax.text(x + 10, slot_y(node, index) + 4, entry["name"], color="#cccccc", fontsize=7.5, zorder=3)
        rows = max(len(node["inputs"]), len(node["outputs"]))
        values = [str(v) for v in node["widgets_values"] if v not in ("", "fixed")]
        text = "\n".join(textwrap.shorten(value, 44) for value in values)
        ax.text(x + 10, slot_y(node, rows) + 6, text, color="#9fd3ff", fontsize=7.5, va="top", zorder=3)
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] + HEADER for n in nodes.values())
    ax.set_xlim(0, right + 40)
    ax.set_ylim(bottom + 20, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(ROOT / "docs" / "comfy_workflow.png", bbox_inches="tight", facecolor=fig.get_facecolor())


if __name__ == "__main__":
    main()
