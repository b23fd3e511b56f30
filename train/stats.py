"""Per-prompt reward statistics for advantage normalisation (DDPO's per-prompt tracking)."""

from __future__ import annotations

from collections import defaultdict, deque

import torch


class PerPromptStatTracker:
    """Running reward mean/std per key (a prompt, or a prompt and reward in parrot mode).

    A key with fewer than ``min_count`` rewards seen normalises with the current batch's statistics instead.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def normalise(self, key: str, rewards: torch.Tensor) -> torch.Tensor:
        """Add ``rewards`` (finite ones) to the key's history and return them as standardised advantages."""
        finite = rewards[torch.isfinite(rewards)]
        self.buffers[key].extend(finite.tolist())
        history = torch.tensor(list(self.buffers[key])) if len(self.buffers[key]) >= self.min_count else finite
        return standardise(rewards, history)

    def state_dict(self) -> dict[str, list[float]]:
        return {key: list(values) for key, values in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers.clear()
        for key, values in state.items():
            self.buffers[key].extend(values)


def standardise(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(values − mean) / std`` with the mean and std of ``reference`` (std floored so constants give 0)."""
    if len(reference) == 0:
        return torch.zeros_like(values)
    return (values - reference.mean()) / (reference.std(unbiased=False) + 1e-6)
