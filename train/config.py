"""Training configuration: one dataclass, YAML presets in ``configs/``, ``key=value`` overrides on the command line.

Every field is checked before any model loads; an unknown key gets the nearest known name as a hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub.utils import validate_repo_id

MODES = ("parrot", "dpok", "ddpo")
ADVANTAGES = ("raw", "batch", "per_prompt")
LORA_TARGETS = {
    # the paper updates only the UNet's cross-attention layers
    "cross_attention": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    # every linear and convolution of the transformer and ResNet blocks
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj"],  # fmt: skip
}
PRECISIONS = ("no", "fp16", "bf16")
# Settings a resumed run must share with its checkpoint: they shape the saved weights or what the rewards mean.
RESUME_FIXED = ("mode", "pretrained_model", "expander_model", "rewards", "reward_options", "reward_identifiers",
                "reward_weights", "lora_rank", "lora_alpha", "lora_targets", "expander_lora_rank", "train_unet",
                "freeze_expander", "expander_sft_data", "mixed_precision", "seed", "validation_prompts",
                "validation_images_per_prompt", "select_by", "collapse_margin")  # fmt: skip
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
RENAMED = {  # keys of earlier releases, and what replaced them
    "accumulate_timesteps": "timesteps always accumulate within a minibatch; `gradient_accumulation_steps` sets the "
    "minibatches per optimiser step (null: all of them, one step per iteration, as `accumulate_timesteps: true` did)",
}


@dataclass
class TrainConfig:
    """All settings of a run. Defaults are the paper-faithful Parrot mode; presets live in ``configs/``."""

    # --- run ---------------------------------------------------------------------------------------------------
    mode: str = "parrot"  # parrot (Pareto multi-reward) | dpok (KL-regularised PG) | ddpo (PPO)
    output_dir: str = "outputs/run"
    overwrite: bool = False  # replace an existing output_dir
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda; several GPUs: accelerate launch
    cpu_threads: int | None = None  # torch's intra-op threads per process; null: torch's default
    mixed_precision: str = "no"  # no | fp16 | bf16: UNet and text encoder weights; log-probs stay float32

    # --- models ------------------------------------------------------------------------------------------------
    pretrained_model: str = "tiny"  # a diffusers folder or Hub id; "tiny": the embedded offline model
    expander_model: str | None = "tiny"  # causal LM folder or Hub id; "tiny"; null: no prompt expansion
    expander_tokenizer: str | None = None  # its tokenizer (folder or Hub id) when its repository has none
    expander_template: str | None = None  # instruction with {prompt}; null: the paper's instruction
    expander_max_new_tokens: int = 77

    # --- data and rewards --------------------------------------------------------------------------------------
    prompts: str = "train/data/quickstart_prompts.txt"  # training prompts, txt (one per line) or JSONL "prompt"
    eval_prompts: str = "train/data/quickstart_eval_prompts.txt"  # held-out prompts for the final evaluation
    rewards: list[str] = field(default_factory=lambda: ["jpeg_compressibility", "colorfulness"])
    reward_options: dict | None = None  # per reward name, its options, e.g. {clip_score: {model: "local-dir:/m"}}
    reward_weights: list[float] | None = None  # dpok/ddpo: weighted sum (default equal weights); parrot: unused
    reward_identifiers: list[str] | None = None  # parrot: default "<reward 1>" … "<reward K>"
    reward_worker_overlap: bool = True  # score a chunk's images in a worker thread while the next chunk samples

    # --- sampling ----------------------------------------------------------------------------------------------
    resolution: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    images_per_prompt: int = 8  # N: images per prompt (per identifier in parrot mode) each iteration
    iterations: int = 100

    # --- policy gradient ---------------------------------------------------------------------------------------
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | linear | cosine, over the iterations
    lr_warmup_iterations: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.1
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None  # gradient-norm clipping; null: off
    train_batch_size: int = 8  # samples per minibatch (per process): sampling chunks and gradient passes
    # Optimiser steps per iteration: num_inner_epochs × ceil(minibatches / gradient_accumulation_steps), the
    # minibatches being this process's selected samples in chunks of train_batch_size (logged as optimizer_steps).
    gradient_accumulation_steps: int | None = None  # minibatches per optimiser step; null: all (one step per epoch)
    num_inner_epochs: int = 1  # passes over each iteration's samples (PPO's epochs)
    timestep_fraction: float = 1.0  # train on a random fraction of each trajectory's timesteps, drawn per sample
    advantage: str = "raw"  # raw (paper) | batch (normalise per reward over the batch) | per_prompt (DDPO)
    advantage_clip: float = 5.0  # for normalised advantages
    clip_range: float | None = None  # PPO ratio clipping; null: off
    kl_beta: float = 0.0  # DPOK's KL to the pretrained UNet; 0: off
    reward_scale: float = 1.0  # DPOK's α
    lora_rank: int = 4
    lora_alpha: float | None = None  # null: equal to the rank
    lora_targets: str = "cross_attention"  # cross_attention (paper) | attention (self + cross) | all
    train_unet: bool = True  # false: the paper's expander-only ablation

    # --- expander ----------------------------------------------------------------------------------------------
    freeze_expander: bool = False  # true: the paper's T2I-only ablation
    expander_learning_rate: float = 1e-5
    expander_lora_rank: int = 8
    expander_sft_data: str | None = None  # JSONL of {"prompt", "expansion"} for the supervised stage; null: skip
    expander_sft_epochs: int = 3
    expander_sft_learning_rate: float = 1e-3
    expander_sft_batch_size: int = 16

    # --- evaluation and logging --------------------------------------------------------------------------------
    eval_every: int = 10  # sample grid every N iterations (0: only at the end)
    eval_images_per_prompt: int = 4
    eval_expansion_guidance_scale: float = 5.0  # w2 of the final evaluation; w1 is guidance_scale

    # --- validation: which iterate the bundle is, early stopping, the collapse guard ----------------------------
    validation_prompts: str = "train/data/quickstart_validation_prompts.txt"  # held out from `eval_prompts`
    validate_every: int = 10  # iterations between validations (also after the last); 0: none, the bundle is the last
    validation_images_per_prompt: int = 4
    # The iterate the bundle is: hypervolume (fewest rewards below the base, then the highest hypervolume), a
    # reward's name (its mean) or last; null: hypervolume with several rewards, the reward itself with one.
    select_by: str | None = None
    patience: int = 0  # stop after this many validations without a new best; 0: run every iteration
    collapse_margin: float | None = None  # a reward this many base standard deviations below its best also collapses
    collapse_action: str = "warn"  # on a collapsed reward: warn | stop | rollback (to the best iterate)
    rollback_lr_factor: float = 0.5  # rollback: the learning rates are multiplied by this

    # --- checkpoints, processes, Hub ---------------------------------------------------------------------------
    checkpoint_every: int = 0  # iterations between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    resume: bool = False  # continue from the newest complete checkpoint in output_dir/checkpoints, if any
    collective_timeout: float = 1800.0  # seconds a process waits for the others before the run stops
    push_to_hub: str | None = None  # Hub repo id ("you/parrot-sd15") for the final bundle; token from HF_TOKEN/login
    hub_private: bool = False  # create the Hub repo as private

    def __post_init__(self):
        check_config(self)

    @property
    def lora_alpha_value(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def selection_rule(self) -> str:
        """What ``select_by`` means for this run's rewards."""
        if self.select_by is not None:
            return self.select_by
        return "hypervolume" if len(self.rewards) > 1 else self.rewards[0]

    @property
    def uses_expander(self) -> bool:
        return self.mode == "parrot" and self.expander_model is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fail(name: str, value, allowed: str):
    raise ValueError(f"config `{name}` = {value!r} is not allowed: {allowed}.")


def check_config(config: TrainConfig) -> None:
    """Range and consistency checks, each naming the field and what is allowed."""
    check_cpu_threads(config.cpu_threads)
    if config.mode not in MODES:
        _fail("mode", config.mode, f"use one of {list(MODES)}")
    if config.advantage not in ADVANTAGES:
        _fail("advantage", config.advantage, f"use one of {list(ADVANTAGES)}")
    if config.lora_targets not in LORA_TARGETS:
        _fail("lora_targets", config.lora_targets, f"use one of {list(LORA_TARGETS)}")
    if config.device not in DEVICES:
        _fail("device", config.device, f"use one of {list(DEVICES)}")
    if config.mixed_precision not in PRECISIONS:
        _fail("mixed_precision", config.mixed_precision, f"use one of {list(PRECISIONS)}")
    for name in ("learning_rate", "expander_learning_rate", "expander_sft_learning_rate", "adam_epsilon", "reward_scale"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            _fail(name, value, "a finite number > 0")
    if config.gradient_accumulation_steps is not None and config.gradient_accumulation_steps < 1:
        _fail("gradient_accumulation_steps", config.gradient_accumulation_steps,
              "null (all minibatches of an epoch in one optimiser step) or an integer ≥ 1")  # fmt: skip
    for name in ("iterations", "images_per_prompt", "num_inference_steps", "train_batch_size", "num_inner_epochs", "lora_rank",
                 "expander_lora_rank", "expander_max_new_tokens", "eval_images_per_prompt", "expander_sft_epochs",
                 "expander_sft_batch_size", "validation_images_per_prompt"):  # fmt: skip
        if getattr(config, name) < 1:
            _fail(name, getattr(config, name), "an integer ≥ 1")
    for name in ("eval_every", "checkpoint_every", "validate_every", "patience", "lr_warmup_iterations"):
        if getattr(config, name) < 0:
            _fail(name, getattr(config, name), "an integer ≥ 0")
    if config.keep_checkpoints < 1:
        _fail("keep_checkpoints", config.keep_checkpoints, "an integer ≥ 1")
    if not (math.isfinite(config.collective_timeout) and config.collective_timeout > 0):
        _fail("collective_timeout", config.collective_timeout, "a finite number of seconds > 0")
    check_push_to_hub(config.push_to_hub)
    if config.resolution < 8 or config.resolution % 8:
        _fail("resolution", config.resolution, "a positive multiple of 8")
    if not (math.isfinite(config.eta) and 0 < config.eta <= 1):
        _fail("eta", config.eta, "in (0, 1]: policy-gradient modes need a stochastic sampler (eta > 0)")
    if not 0 < config.timestep_fraction <= 1:
        _fail("timestep_fraction", config.timestep_fraction, "in (0, 1]")
    for name in ("guidance_scale", "kl_beta", "weight_decay", "eval_expansion_guidance_scale", "advantage_clip"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            _fail(name, value, "a finite number ≥ 0")
    for name in ("clip_range", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            _fail(name, value, "null (off) or a finite number > 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, name) < 1:
            _fail(name, getattr(config, name), "in [0, 1)")
    if len(config.rewards) == 0:
        _fail("rewards", config.rewards, "at least one reward name")
    if len(set(config.rewards)) != len(config.rewards):
        _fail("rewards", config.rewards, "each reward once")
    from .rewards import resolve_reward

    options = config.reward_options or {}
    unknown = sorted(set(options) - set(config.rewards))
    if unknown:
        _fail("reward_options", config.reward_options, f"options only for rewards in `rewards`, not {unknown}")
    for name in config.rewards:
        resolve_reward(name, options.get(name))
    if config.lora_alpha is not None and not (math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
        _fail("lora_alpha", config.lora_alpha, "null (equal to the rank) or a finite number > 0")
    if config.reward_weights is not None and not all(math.isfinite(weight) for weight in config.reward_weights):
        _fail("reward_weights", config.reward_weights, "finite numbers")
    if config.reward_weights is not None and len(config.reward_weights) != len(config.rewards):
        _fail("reward_weights", config.reward_weights, f"one weight per reward ({len(config.rewards)})")
    if config.reward_identifiers is not None and len(config.reward_identifiers) != len(config.rewards):
        _fail("reward_identifiers", config.reward_identifiers, f"one identifier per reward ({len(config.rewards)})")
    if config.mode == "parrot" and config.reward_weights is not None:
        _fail("reward_weights", config.reward_weights, "null in parrot mode (Pareto selection uses no weights)")
    if config.mode == "parrot" and len(config.rewards) < 2:
        _fail("rewards", config.rewards, "at least two rewards in parrot mode (Pareto selection needs K ≥ 2)")
    check_validation(config)
    if not config.train_unet and (config.freeze_expander or not config.uses_expander):
        _fail("train_unet", False, "true unless an expander is trained (freeze_expander: false, parrot mode)")


def check_validation(config: TrainConfig) -> None:
    """The validation, selection, collapse-guard and schedule settings."""
    from .validation import COLLAPSE_ACTIONS

    if config.lr_scheduler not in LR_SCHEDULERS:
        _fail("lr_scheduler", config.lr_scheduler, f"use one of {list(LR_SCHEDULERS)}")
    if config.lr_warmup_iterations >= config.iterations:
        _fail("lr_warmup_iterations", config.lr_warmup_iterations, f"fewer than `iterations` ({config.iterations})")
    rules = ["hypervolume", "last", *config.rewards]
    if config.select_by is not None and config.select_by not in rules:
        _fail("select_by", config.select_by, f"null or one of {rules}")
    if config.select_by == "hypervolume" and len(config.rewards) < 2:
        _fail("select_by", config.select_by, f"a reward's name or last with a single reward ({config.rewards[0]!r})")
    if config.collapse_action not in COLLAPSE_ACTIONS:
        _fail("collapse_action", config.collapse_action, f"use one of {list(COLLAPSE_ACTIONS)}")
    if config.collapse_margin is not None and not (math.isfinite(config.collapse_margin) and config.collapse_margin >= 0):
        _fail("collapse_margin", config.collapse_margin, "null (only a fall below the base) or a finite number ≥ 0")
    if not (math.isfinite(config.rollback_lr_factor) and 0 < config.rollback_lr_factor <= 1):
        _fail("rollback_lr_factor", config.rollback_lr_factor, "in (0, 1]")
    if config.select_by == "last" and (config.patience or config.collapse_action == "rollback"):
        _fail("select_by", "last", "hypervolume or a reward's name with patience or collapse_action: rollback, which "
              "need a best iterate")  # fmt: skip


def check_cpu_threads(value: int | None) -> None:
    if value is not None and value < 1:
        _fail("cpu_threads", value, "null (torch's default) or an integer ≥ 1")


def check_push_to_hub(repo_id: str | None) -> None:
    """``push_to_hub`` is null or a Hub repo id with its owner."""
    if repo_id is None:
        return
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        _fail("push_to_hub", repo_id, f"a Hub repo id such as 'your-name/parrot-sd15' ({error})")
    if "/" not in repo_id:
        _fail("push_to_hub", repo_id, "a Hub repo id with its owner, such as 'your-name/parrot-sd15'")


def resume_differences(saved: dict, config, fixed: tuple[str, ...] = RESUME_FIXED) -> list[str]:
    """The settings in ``fixed`` where ``config`` differs from a checkpoint's saved config."""
    current = config.to_dict()
    return [f"{name}: checkpoint {saved.get(name)!r}, now {current[name]!r}"
            for name in fixed if saved.get(name) != current[name]]  # fmt: skip


def _coerce(name: str, hint, value):
    """Check ``value`` against a field's type hint (bool, int, float, str, lists, Optional)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise TypeError(f"config `{name}` must not be null.")
    for option in options:
        origin = typing.get_origin(option)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _parses_as_float(value):
            return float(value)  # "1e-5", "3E-4", "inf": what Python's float() reads
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, dict):
            return value
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(option)
            return [_coerce(f"{name}[{i}]", item_type, item) for i, item in enumerate(value)]
    readable = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise TypeError(f"config `{name}` must be {readable}, got {value!r} ({type(value).__name__}).")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_config(values: dict, config_class=TrainConfig):
    """``config_class`` (a config dataclass) from a mapping, each value checked against its field's type."""
    hints = typing.get_type_hints(config_class)
    for key in values:
        if key in RENAMED:
            raise ValueError(f"Config key `{key}` is gone: {RENAMED[key]}.")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            suggestion = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"Unknown config key `{key}`.{suggestion}")
    return config_class(**{key: _coerce(key, hints[key], value) for key, value in values.items()})


class ConfigLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false, so ``mixed_precision: no`` stays the string "no"."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2's floats: an exponent needs no dot, so `1e-5` is a number as in Python, not the string YAML 1.1 makes it.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"), list("-+.0123456789")
)


def read_yaml(text):
    return yaml.load(text, Loader=ConfigLoader)


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML (``lr=1e-4``, ``rewards=[a,b]``, ``clip_range=null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"Override {text!r} must look like key=value.")
    return key.strip(), read_yaml(raw)


def load_config(path: str | Path | None, overrides: list[str] = (), config_class=TrainConfig):
    """A YAML preset (or nothing) with ``key=value`` overrides on top, as ``config_class``."""
    values = {}
    if path is not None:
        with open(path, encoding="utf-8") as file:
            values = read_yaml(file) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}.")
    values.update(parse_override(item) for item in overrides)
    return build_config(values, config_class)
