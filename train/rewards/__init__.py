"""Rewards: callables ``(images [N,3,H,W] in [0,1], prompts, metadata) -> Tensor[N]``, higher is better.

A reward is found by registry name (``jpeg_compressibility``) or as ``module:function`` for a user's own. Each
registered reward states its usual range. ``metadata`` is a dict; training passes ``original_prompts`` (the
prompts before expansion) and ``expanded_prompts``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

RewardFn = Callable[[torch.Tensor, Sequence[str], dict], torch.Tensor]


@dataclass(frozen=True)
class RewardInfo:
    name: str
    create: Callable[..., RewardFn]  # options -> reward; learned rewards load their checkpoint lazily
    value_range: str
    description: str
    higher_is_better: bool = True


REGISTRY: dict[str, RewardInfo] = {}


def register(name: str, *, value_range: str, description: str):
    """Register a reward function (no options) or a class whose instances are rewards (options are its kwargs)."""

    def decorate(reward):
        create = reward if isinstance(reward, type) else (lambda: reward)
        REGISTRY[name] = RewardInfo(name, create, value_range, description)
        return reward

    return decorate


def resolve_reward(name: str, options: dict | None = None) -> RewardFn:
    """A registered reward by name (built with ``options``), or a user's ``package.module:function``."""
    options = options or {}
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        if options:
            raise ValueError(f"Reward {name!r} is a user function; `reward_options` apply to registered rewards only.")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Reward {name!r}: cannot import {attribute!r} from module {module_name!r} ({error}).") from None
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown reward {name!r}.{hint} Known rewards: {sorted(REGISTRY)}; or give 'module:function'."
        )
    try:
        return REGISTRY[name].create(**options)
    except TypeError as error:
        raise ValueError(f"Invalid `reward_options` for reward {name!r}: {error}.") from None


def score_images(
    rewards: dict[str, RewardFn], images: torch.Tensor, prompts: Sequence[str], metadata: dict
) -> torch.Tensor:
    """Score ``images`` with every reward: a float32 ``[N, K]`` matrix, columns in the order of ``rewards``."""
    columns = []
    for name, reward in rewards.items():
        values = torch.as_tensor(reward(images, prompts, metadata))
        if values.shape != (len(images),):
            raise ValueError(
                f"Reward {name!r} returned shape {tuple(values.shape)} for {len(images)} images; it must return "
                f"one value per image, shape ({len(images)},)."
            )
        columns.append(values.detach().float().cpu())
    return torch.stack(columns, dim=1)


from . import aesthetic, clip, dino, hpsv2, image_stats, lambda_harmonic, pickscore, sentiment  # noqa: E402,F401
