"""The prompt expander: a causal language model (optionally with a LoRA adapter) that rewrites a short prompt.

One implementation shared by the pipeline, the ComfyUI nodes and training. The LoRA adapter is attached, loaded and
saved through peft's own ``PeftModel`` rather than transformers' peft integration (``add_adapter``/``load_adapter``),
whose minimum peft version moves with each transformers release.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .hub import local_folder

# The instruction the Parrot paper used to fine-tune its prompt expansion network. The paper's string ends with
# "Output: "; the trailing space is left out because byte-level BPE tokenizers (GPT-2 family) then emit the first
# word as " word", exactly as it is tokenized in training pairs.
DEFAULT_TEMPLATE = (
    "Input: {prompt}. This is a text input for image generation. Expand prompt for improving image quality. Output:"
)
PROMPT_PLACEHOLDER = "{prompt}"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# The attention and MLP projections a LoRA on the expander targets: GPT-2 names, then Llama-style names.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ExpanderConfig:
    """How the expander is prompted and how it generates; stored in a bundle's ``parrot_config.json``."""

    base_model: str | None = None
    template: str = DEFAULT_TEMPLATE
    max_new_tokens: int = 77
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        if self.template.count(PROMPT_PLACEHOLDER) != 1:
            raise ValueError(
                f"expander `template` must contain {PROMPT_PLACEHOLDER!r} exactly once, got {self.template!r}."
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"expander `max_new_tokens` must be an integer ≥ 1, got {self.max_new_tokens!r}.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"expander `temperature` must be a finite number > 0, got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"expander `top_k` must be an integer ≥ 0 (0 disables it), got {self.top_k!r}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"expander `top_p` must be in (0, 1], got {self.top_p!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExpanderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown expander setting(s) {unknown}; allowed: {sorted(known)}.")
        return cls(**data)

    def instruction(self, prompt: str) -> str:
        return self.template.replace(PROMPT_PLACEHOLDER, prompt)


def compose_expanded_prompt(identifiers: Sequence[str], expansion: str) -> str:
    """The text of the expanded branch ``ĉ``: reward identifiers, then the expansion, joined with ", "."""
    return ", ".join([*identifiers, expansion] if expansion else identifiers)


@dataclass
class GeneratedExpansions:
    """Sampled expansions with the token ids training needs for their log-probabilities."""

    texts: list[str]
    input_ids: torch.Tensor  # [B, L] instruction tokens, left-padded
    attention_mask: torch.Tensor  # [B, L]
    new_tokens: torch.Tensor  # [B, T] generated tokens
    new_mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    # [B, T, V] bool, with ``record_support``: the tokens the sampler could draw at each step, what top-k, top-p
    # and the model's suppressed tokens left of the vocabulary
    support: torch.Tensor | None = None


@torch.no_grad()
def generate_expansions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: ExpanderConfig,
    seed: int | None = None,
    record_support: bool = False,
) -> GeneratedExpansions:
    """Expand a batch of prompts in one ``generate`` call.

    Sampling draws from torch's RNG, forked and seeded with ``seed`` when one is given, so the same seed gives the
    same expansions and the caller's RNG state is left untouched. ``record_support`` keeps each step's support of
    the sampling distribution (from ``generate``'s processed scores), so training scores an expansion under the
    distribution it was drawn from.
    """
    inputs = tokenizer(
        [config.instruction(prompt) for prompt in prompts], return_tensors="pt", padding=True, padding_side="left"
    ).to(model.device)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(
            **inputs,
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature if config.do_sample else None,
            top_k=config.top_k if config.do_sample else None,
            top_p=config.top_p if config.do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_scores=record_support,
        )
    new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
    is_eos = new_tokens == tokenizer.eos_token_id
    new_mask = (torch.cumsum(is_eos, dim=1) - is_eos.long()) == 0
    texts = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    support = torch.stack(output.scores, dim=1).isfinite() if record_support else None
    return GeneratedExpansions(texts, inputs["input_ids"], inputs["attention_mask"], new_tokens, new_mask.long(), support)


def expand_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: ExpanderConfig,
    seed: int | None = None,
) -> list[str]:
    """Expand a batch of prompts; returns only the newly generated text of each."""
    return generate_expansions(model, tokenizer, prompts, config, seed).texts


def continuation_log_probs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    new_mask: torch.Tensor,
    support: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sum of the log-probabilities of ``new_tokens`` (where ``new_mask``) after each left-padded prompt, with
    gradients: ``log p_φ(ĉ | c)`` for REINFORCE and, negated and averaged, the supervised loss.

    With ``support`` (``GeneratedExpansions.support``) and the sampling ``temperature``, under the distribution
    the tokens were sampled from: the softmax of ``logits / temperature`` over each step's support. Without, under
    the model's full distribution (teacher forcing).
    """
    tokens = torch.cat([input_ids, new_tokens], dim=1)
    mask = torch.cat([attention_mask, new_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
    start = input_ids.shape[1]
    logits = logits[:, start - 1 : -1].float() / temperature
    if support is not None:
        logits = logits.masked_fill(~support, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)
    token_log_probs = log_probs.gather(2, new_tokens.unsqueeze(2)).squeeze(2)
    # padding after EOS may lie outside the support (log-prob −inf): where, not a product, leaves it out
    return torch.where(new_mask.bool(), token_log_probs, 0.0).sum(dim=1)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], expansions: Sequence[str], config: ExpanderConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt → expansion) pairs as ``continuation_log_probs`` inputs; each expansion ends with EOS."""
    instructions = [config.instruction(prompt) for prompt in prompts]
    inputs = tokenizer(instructions, return_tensors="pt", padding=True, padding_side="left")
    # The expansion continues the instruction's text: a space separates them unless the template ends with one.
    targets = tokenizer(
        [("" if i[-1:].isspace() else " ") + text.strip() + tokenizer.eos_token for i, text in zip(instructions, expansions)],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    return inputs["input_ids"], inputs["attention_mask"], targets["input_ids"], targets["attention_mask"]


def add_lora(model: PreTrainedModel, rank: int, alpha: float | None = None) -> PeftModel:
    """``model`` wrapped in a fresh peft LoRA (adapter ``"default"``, so ``save_pretrained`` writes it at the top of
    its folder) on every projection of ``LORA_TARGETS`` the model has; ``alpha`` defaults to ``rank``."""
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(LORA_TARGETS))
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores its weights transposed
    )
    return get_peft_model(model, config)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model"))


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME))


def load_expander(
    path_or_repo_id: str | os.PathLike,
    *,
    base_model: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    use_safetensors: bool | None = None,
    **hub_kwargs,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder or Hub repo.

    If the folder holds a peft adapter (``adapter_config.json``), the base model named by ``base_model`` (or by the
    adapter's own ``base_model_name_or_path``) is loaded and wrapped in a ``PeftModel`` with the adapter, whose
    config then names the base model actually loaded. The tokenizer comes from ``tokenizer`` (a folder or Hub id,
    for models whose repository has none, as Promptist uses GPT-2's), else from the folder when it has one, else
    from the base model. The tokenizer pads with its EOS token when it has no pad token (GPT-2 style models), which
    batched generation needs.
    """
    folder = local_folder(path_or_repo_id, what="expander", **hub_kwargs)
    model_folder = folder
    if is_adapter_folder(folder):
        with open(folder / ADAPTER_CONFIG_NAME) as file:
            base_model = base_model or json.load(file).get("base_model_name_or_path")
        if not base_model:
            raise ValueError(
                f"expander adapter {str(path_or_repo_id)!r} does not name its base model; pass `base_model`."
            )
        model_folder = local_folder(base_model, what="expander base model", **hub_kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch_dtype, use_safetensors=use_safetensors)
    if model_folder != folder:
        model = PeftModel.from_pretrained(model, folder)
        model.active_peft_config.base_model_name_or_path = base_model
    if tokenizer is not None:
        tokenizer_folder = local_folder(tokenizer, what="expander tokenizer", **hub_kwargs)
    else:
        tokenizer_folder = next((f for f in (folder, model_folder) if _has_tokenizer(f)), None)
    if tokenizer_folder is None:
        raise ValueError(
            f"expander {str(path_or_repo_id)!r}: no tokenizer files (tokenizer.json, vocab.json…) found; name the "
            "tokenizer it uses (`expander_tokenizer`)."
        )
    loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if loaded_tokenizer.pad_token is None:
        loaded_tokenizer.pad_token = loaded_tokenizer.eos_token
    model.eval()
    return model, loaded_tokenizer
