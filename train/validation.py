"""Which iterate a run keeps: validations on held-out prompts, the best one so far with a copy of its state, early
stopping, and the guard that notices a reward collapsing. The Parrot/DPOK/DDPO trainer and RPO both use it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .pareto import reward_range, scaled_hypervolume

COLLAPSE_ACTIONS = ("warn", "stop", "rollback")


class BestIterate:
    """The best validation of a run so far and a snapshot of what produced it.

    ``offer`` keeps the snapshot when the score beats every earlier one; iteration 0 (the model before training, the
    run's "before") is never kept. ``patience`` validations in a row without a new best end the run (0: never).
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.iteration: int | None = None
        self.score = None
        self.snapshot = None
        self.since_best = 0  # validations after the best one

    def offer(self, iteration: int, score, snapshot: Callable[[], object] | None) -> bool:
        """Record a validation's ``score`` (anything ordered; higher is better); ``snapshot()`` is called, and its
        result kept, only for a new best (``None``: keep nothing, e.g. on the processes that do not write the
        result). Returns whether it is the new best."""
        if iteration == 0:
            return False
        if self.iteration is None or score > self.score:
            self.iteration, self.score, self.since_best = iteration, score, 0
            self.snapshot = snapshot() if snapshot is not None else None
            return True
        self.since_best += 1
        return False

    def patience_exhausted(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "score": self.score, "snapshot": self.snapshot, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.score = state["iteration"], state["score"]
        self.snapshot, self.since_best = state["snapshot"], state["since_best"]


class RewardValidation:
    """Multi-reward validations: each reward's mean and the hypervolume of the reward vectors, on a scale fixed by
    the first validation (the base model: each reward's range over its images maps to [0, 1], its worst value
    being the reference point), so that every later validation is measured against the same base.

    ``select_by`` orders the iterates: "hypervolume" (fewest rewards below the base, then the highest
    hypervolume) or a reward name (that reward's mean). ``collapse_margin``: a reward more than this many base
    standard deviations below its own best validation has also collapsed (null: only a fall below the base).
    """

    def __init__(self, reward_names: list[str], select_by: str, collapse_margin: float | None):
        self.reward_names = list(reward_names)
        self.select_by = select_by
        self.collapse_margin = collapse_margin
        self.records: list[dict] = []
        self.scale: dict | None = None  # the base validation's per-reward low, high and standard deviation

    @property
    def base(self) -> dict:
        return self.records[0]

    def record(self, iteration: int, rewards: torch.Tensor) -> dict:
        """The validation of ``rewards`` ``[images, K]``; the first one recorded sets the scale."""
        if self.scale is None:
            low, high = reward_range(rewards)
            spread = torch.stack([column[torch.isfinite(column)].std() for column in rewards.T])
            self.scale = {"low": low.tolist(), "high": high.tolist(), "std": spread.tolist()}
        low, high = torch.tensor(self.scale["low"]), torch.tensor(self.scale["high"])
        record = {"iteration": iteration}
        for k, name in enumerate(self.reward_names):
            record[f"validation/{name}"] = rewards[:, k].nanmean().item()
        record["validation/hypervolume"] = scaled_hypervolume(rewards, low, high)
        return record

    def add(self, record: dict) -> None:
        self.records.append(record)

    def below_base(self, record: dict) -> list[str]:
        """The rewards whose validation mean is below the base model's (a non-finite mean counts as below)."""
        return [name for name in self.reward_names
                if not record[f"validation/{name}"] >= self.base[f"validation/{name}"]]  # fmt: skip

    def score(self, record: dict):
        if self.select_by == "hypervolume":
            hypervolume = record["validation/hypervolume"]
            return (-len(self.below_base(record)), hypervolume if math.isfinite(hypervolume) else -math.inf)
        value = record[f"validation/{self.select_by}"]
        return value if math.isfinite(value) else -math.inf

    def collapsed(self, record: dict) -> dict[str, str]:
        """The collapsed rewards of ``record`` (a trained iterate's validation, already added), each with why."""
        reasons = {}
        for k, name in enumerate(self.reward_names):
            key = f"validation/{name}"
            value, base = record[key], self.base[key]
            best = max((r[key] for r in self.records[1:] if math.isfinite(r[key])), default=value)
            if not value >= base:
                reasons[name] = f"{name} {value:.4g} is below the base model's {base:.4g}"
            elif self.collapse_margin is not None and value < best - self.collapse_margin * self.scale["std"][k]:
                reasons[name] = (f"{name} {value:.4g} is more than {self.collapse_margin:g} base standard deviations "
                                 f"below its best validation, {best:.4g}")  # fmt: skip
        return reasons

    def state_dict(self) -> dict:
        return {"records": self.records, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.records, self.scale = state["records"], state["scale"]


def scale_learning_rates(optimizer: torch.optim.Optimizer, scheduler, factor: float) -> None:
    """Multiply an optimiser's learning rates by ``factor``, now and for the rest of its schedule."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] = group.get("initial_lr", group["lr"] / factor) * factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
