"""Batch-wise Pareto selection and the hypervolume used to compare reward trade-offs."""

from __future__ import annotations

import torch


def non_dominated_mask(rewards: torch.Tensor) -> torch.Tensor:
    """First Pareto front of a batch of reward vectors (higher is better for every column).

    ``rewards`` is ``[N, K]``; returns a bool ``[N]``. Row ``a`` dominates ``b`` when it is ≥ on every reward and
    > on at least one. A row holding NaN (or ±inf) is never selected and never dominates. Vectorised, O(N²K).
    """
    if rewards.ndim != 2:
        raise ValueError(f"`rewards` must be a [N, K] tensor, got shape {tuple(rewards.shape)}.")
    finite = torch.isfinite(rewards).all(dim=1)
    values = rewards.float().nan_to_num(0.0, 0.0, 0.0)
    a, b = values[:, None, :], values[None, :, :]
    dominates = (a >= b).all(dim=2) & (a > b).any(dim=2) & finite[:, None]
    return finite & ~dominates.any(dim=0)


def hypervolume(points: torch.Tensor, reference: torch.Tensor) -> float:
    """Exact volume of the region dominated by ``points`` ``[N, K]`` and bounded below by ``reference`` ``[K]``.

    Computed by slicing along the last objective (exact for any K; fine for the few hundred points of an
    evaluation). Points not strictly better than the reference on every objective add nothing.
    """
    points = points.double()
    reference = reference.double()
    points = points[(points > reference).all(dim=1)]
    if len(points) == 0:
        return 0.0
    points = points[non_dominated_mask(points)]
    if points.shape[1] == 1:
        return float(points.max() - reference[0])
    # Sweep the last objective from high to low; each slab's area is the hypervolume of the points reaching it.
    order = torch.argsort(points[:, -1], descending=True)
    points = points[order]
    volume = 0.0
    for i in range(len(points)):
        upper = points[i, -1]
        lower = points[i + 1, -1] if i + 1 < len(points) else reference[-1]
        if upper > lower:
            volume += hypervolume(points[: i + 1, :-1], reference[:-1]) * float(upper - lower)
    return volume


def scaled_hypervolume(matrix: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> float:
    """Hypervolume of the reward vectors ``matrix`` ``[N, K]`` with every reward rescaled so that ``low`` maps to 0 and
    ``high`` to 1, the reference point at the origin; a non-finite reward counts as the worst value."""
    scaled = ((matrix - low) / (high - low).clamp(min=1e-12)).nan_to_num(0.0, 0.0, 0.0)
    return hypervolume(scaled, torch.zeros(matrix.shape[1]))


def reward_range(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reward's smallest and largest finite value in ``matrix`` ``[N, K]``."""
    low = matrix.nan_to_num(float("inf"), float("inf"), float("inf")).min(dim=0).values
    high = matrix.nan_to_num(float("-inf"), float("-inf"), float("-inf")).max(dim=0).values
    return low, high


def compare_reward_sets(matrices: dict[str, torch.Tensor], reward_names: list[str]) -> dict[str, dict]:
    """Each set's reward means and the hypervolume of its reward vectors, on one common scale.

    Every reward is rescaled to [0, 1] with its minimum and maximum over all the sets, and the reference point is
    the origin (the worst value seen of each reward), so the hypervolumes of the sets can be compared. Rows with a
    non-finite reward count as the worst value.
    """
    low, high = reward_range(torch.cat(list(matrices.values())))
    return {
        label: {
            "means": {name: matrix[:, k].nanmean().item() for k, name in enumerate(reward_names)},
            "hypervolume": scaled_hypervolume(matrix, low, high),
        }
        for label, matrix in matrices.items()
    }
