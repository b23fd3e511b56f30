"""Supervised stage of the prompt expander on (prompt → expansion) pairs, before reinforcement learning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from parrot_pipeline.expansion import ExpanderConfig, continuation_log_probs, tokenize_pairs


def load_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read a JSONL file of ``{"prompt": ..., "expansion": ...}`` objects."""
    pairs = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, expansion = record["prompt"], record["expansion"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{number}: each line must be a JSON object with string fields 'prompt' and 'expansion' "
                    f"({type(error).__name__}: {error})."
                ) from None
            if not (isinstance(prompt, str) and isinstance(expansion, str) and prompt and expansion):
                raise ValueError(f"{path}:{number}: 'prompt' and 'expansion' must be non-empty strings.")
            pairs.append((prompt, expansion))
    if not pairs:
        raise ValueError(f"{path} holds no (prompt, expansion) pairs.")
    return pairs


def pair_loss(model, tokenizer, pairs, config: ExpanderConfig) -> torch.Tensor:
    """Mean negative log-likelihood per expansion token (the expansion's EOS included)."""
    inputs = [t.to(model.device) for t in tokenize_pairs(tokenizer, *zip(*pairs), config)]
    log_probs = continuation_log_probs(model, *inputs)
    return -log_probs.sum() / inputs[3].sum()


def supervised_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    config: ExpanderConfig,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Fine-tune every weight of ``model`` on the pairs; returns the mean loss of each epoch."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    order = list(range(len(pairs)))
    shuffler = random.Random(seed)
    epoch_losses = []
    for _ in range(epochs):
        shuffler.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_size):
            loss = pair_loss(model, tokenizer, [pairs[i] for i in order[start : start + batch_size]], config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses
