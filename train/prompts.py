"""Prompt files: plain text, JSONL, and the TSV/CSV tables benchmarks ship (PartiPrompts, DrawBench)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Header names of the prompt column: ours, PartiPrompts' (PartiPrompts.tsv) and DrawBench's (its CSV export).
PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file, in order, blank ones skipped.

    ``.txt`` (or any other suffix): one prompt per line. ``.jsonl``: one JSON object per line with a string field
    ``prompt``. ``.tsv`` / ``.csv``: a header row naming a prompt column (``prompt``, ``Prompt`` or ``Prompts``);
    the other columns are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompt file {str(path)!r} does not exist.")
    if path.suffix in (".tsv", ".csv"):
        prompts = _table_prompts(path, delimiter="\t" if path.suffix == ".tsv" else ",")
    elif path.suffix == ".jsonl":
        prompts = _jsonl_prompts(path)
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ValueError(f"Prompt file {str(path)!r} holds no prompts.")
    return prompts


def _jsonl_prompts(path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}:{number}: each line must be a JSON object with a string field 'prompt' "
                f"({type(error).__name__}: {error})."
            ) from None
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: field 'prompt' must be a string, got {type(prompt).__name__}.")
        prompts.append(prompt.strip())
    return prompts


def _table_prompts(path: Path, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        column = next((name for name in PROMPT_COLUMNS if name in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(
                f"{path}: the header row {reader.fieldnames} has no prompt column; name it one of "
                f"{list(PROMPT_COLUMNS)} ('Prompt' is PartiPrompts', 'Prompts' DrawBench's)."
            )
        return [(row[column] or "").strip() for row in reader]
