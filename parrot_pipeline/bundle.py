"""The Parrot bundle: one folder (local or a Hub repo) holding everything a trained Parrot model adds to its base.

Layout::

    parrot_config.json                 format_version, base_model, reward names and identifiers, scales, expander
    pytorch_lora_weights.safetensors   UNet LoRA, diffusers format with adapter metadata (stock load_lora_weights)
    parrot_lora_kohya.safetensors      the same LoRA in kohya naming (ComfyUI / A1111 LoRA loaders)
    expander/                          peft adapter (or full model) of the prompt expander, and its tokenizer
    pipeline.py                        entry for DiffusionPipeline.from_pretrained(..., custom_pipeline=<bundle>)
    README.md                          the Hub model card
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import peft
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .expansion import ExpanderConfig, load_expander
from .hub import local_folder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "parrot_config.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "parrot_lora_kohya.safetensors"
EXPANDER_FOLDER = "expander"
PIPELINE_FILE = "pipeline.py"
CARD_FILE = "README.md"
GALLERY_FOLDER = "samples"
CARD_EXTRA_MARKER = "<!-- parrot: extra sections -->"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a bundle downloads from the Hub: the files of the layout above (samples/ and anything else stay behind).
BUNDLE_FILES = [CONFIG_NAME, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, f"{EXPANDER_FOLDER}/*", PIPELINE_FILE, CARD_FILE]
UNET_PREFIX = "unet."
METHODS = ("parrot", "dpok", "ddpo", "rpo")
METHOD_DESCRIPTIONS = {  # the model card's one-line description of each training method
    "parrot": "multi-reward reinforcement learning with batch-wise Pareto selection",
    "dpok": "policy-gradient reinforcement learning with a KL regulariser to the pretrained model",
    "ddpo": "PPO on the denoising steps",
    "rpo": "subject-driven preference fine-tuning with the λ-harmonic reward",
}
# The paper's w1 = w2 = 5: defaults of a bundle, and of ParrotPipeline when no bundle is loaded.
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_EXPANSION_GUIDANCE_SCALE = 5.0

BUNDLE_PIPELINE_SOURCE = '''\
# Custom-pipeline entry of this Parrot bundle:
#   DiffusionPipeline.from_pretrained(base, custom_pipeline="<this bundle>", trust_remote_code=True)
# It needs the parrot-pipeline package: pip install parrot-pipeline
from parrot_pipeline import ParrotPipeline

__all__ = ["ParrotPipeline"]
'''


def default_reward_identifiers(num_rewards: int) -> list[str]:
    """The paper's identifiers: ``<reward 1>`` … ``<reward K>``."""
    return [f"<reward {k}>" for k in range(1, num_rewards + 1)]


@dataclass
class ParrotConfig:
    """Contents of ``parrot_config.json``."""

    base_model: str
    reward_names: list[str]
    reward_identifiers: list[str]
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    expansion_guidance_scale: float = DEFAULT_EXPANSION_GUIDANCE_SCALE
    expander: ExpanderConfig | None = None
    method: str = "parrot"
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.expander, dict):
            self.expander = ExpanderConfig.from_dict(self.expander)
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"`base_model` must be a non-empty string (a Hub id or a path), got {self.base_model!r}.")
        for name in ("reward_names", "reward_identifiers"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"`{name}` must be a list of non-empty strings, got {values!r}.")
            if len(set(values)) != len(values):
                raise ValueError(f"`{name}` must not repeat an entry, got {values!r}.")
            setattr(self, name, list(values))
        if self.reward_identifiers and len(self.reward_names) != len(self.reward_identifiers):
            raise ValueError(
                f"`reward_identifiers` must have one entry per reward name, or none (a model trained without "
                f"identifiers): {len(self.reward_names)} names {self.reward_names} but "
                f"{len(self.reward_identifiers)} identifiers {self.reward_identifiers}."
            )
        for name in ("guidance_scale", "expansion_guidance_scale"):
            check_scale(name, getattr(self, name))
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}.")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"Parrot bundle `format_version` {self.format_version!r} is not supported by this version of "
                f"parrot-pipeline (it reads version {FORMAT_VERSION}); upgrade parrot-pipeline."
            )

    def select_identifiers(self, selection: list[int | str], field: str = "reward_identifiers") -> list[str]:
        """The identifiers of the rewards in ``selection`` (indices or reward names), in its order.

        ``field`` names the caller's argument in error messages.
        """
        names, identifiers = self.reward_names, self.reward_identifiers
        if selection and not identifiers:
            raise ValueError(
                f"`{field}`: this bundle has no reward identifiers (it was trained without them); select none."
            )
        chosen = []
        for item in selection:
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(identifiers):
                chosen.append(identifiers[item])
            elif isinstance(item, str) and item in names:
                chosen.append(identifiers[names.index(item)])
            else:
                raise ValueError(
                    f"Unknown entry {item!r} in `{field}`: use indices 0..{len(names) - 1} or reward names {names}."
                )
        return chosen

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["expander"] = self.expander.to_dict() if self.expander else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ParrotConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown field(s) {unknown} in {CONFIG_NAME}; allowed: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParrotConfig:
        with open(path, encoding="utf-8") as file:
            try:
                data = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Invalid {path}: {error}") from None


def check_scale(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number ≥ 0, got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# LoRA formats


# LoraConfig fields a bundle always records: diffusers' loader reads the patterns, and people read the rest.
LORA_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")


def unet_lora_state_dict(unet: UNet2DConditionModel, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet adapter's weights in diffusers' file naming (``unet.<module>.lora_A.weight``) and its LoraConfig.

    The config keeps ``LORA_CONFIG_FIELDS`` and the fields that differ from peft's defaults: each peft release adds
    fields that older releases refuse, so a bundle written with a newer peft then loads with an older one.
    """
    weights = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state_dict = {UNET_PREFIX + key: value.detach().cpu().contiguous() for key, value in weights.items()}
    defaults = LoraConfig().to_dict()
    lora_config = {
        key: value
        for key, value in unet.peft_config[adapter_name].to_dict().items()
        if key in LORA_CONFIG_FIELDS or value != defaults.get(key)
    }
    return state_dict, lora_config


def diffusers_to_kohya(state_dict: dict[str, torch.Tensor], lora_config: dict) -> dict[str, torch.Tensor]:
    """Convert a diffusers/peft UNet LoRA to kohya naming (``lora_unet_…lora_down.weight``, ``.alpha``).

    kohya files carry one ``alpha`` per module, applied as ``alpha / rank``; it is computed from the adapter's
    ``lora_alpha``/``alpha_pattern``/``use_rslora`` so the kohya file scales exactly like the peft adapter.
    """
    kohya = convert_state_dict_to_kohya(state_dict)
    alpha_pattern = lora_config.get("alpha_pattern") or {}
    for key, tensor in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(UNET_PREFIX) : -len(".lora_A.weight")]
        rank = tensor.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), lora_config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if lora_config.get("use_rslora") else alpha / rank
        kohya["lora_unet_" + module.replace(".", "_") + ".alpha"] = torch.tensor(scaling * rank)
    return kohya


def kohya_to_diffusers(kohya_state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Convert a kohya SD 1.x/2.x UNet LoRA to diffusers/peft naming with diffusers' own converters.

    Returns the state dict (``unet.<module>.lora_A.weight`` …) and each module's kohya alpha.
    """
    old_style, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(kohya_state_dict))
    weights = convert_unet_state_dict_to_peft({k.removeprefix(UNET_PREFIX): v for k, v in old_style.items()})
    alphas = convert_unet_state_dict_to_peft(
        {k.removeprefix(UNET_PREFIX).removesuffix(".alpha"): v for k, v in network_alphas.items()}
    )
    return (
        {UNET_PREFIX + key: value for key, value in weights.items()},
        {key.removesuffix(".lora_A.weight"): alpha for key, alpha in alphas.items()},
    )


def check_lora_fits(unet: UNet2DConditionModel, state_dict: dict[str, torch.Tensor], base_model: str, source) -> None:
    """Raise a ValueError naming the bundle's base model unless every LoRA matrix fits a layer of ``unet``."""
    for key, tensor in state_dict.items():
        if not key.startswith(UNET_PREFIX):
            raise ValueError(f"Bundle {source}: LoRA key {key!r} is not a UNet key; only UNet LoRA is supported.")
        module_name, _, matrix = key[len(UNET_PREFIX) :].rpartition(".lora_")
        problem = None
        try:
            layer = unet.get_submodule(module_name)
        except AttributeError:
            problem = f"this UNet has no layer {module_name!r}"
        else:
            layer = getattr(layer, "base_layer", layer)
            if isinstance(layer, torch.nn.Linear):
                size, expected = (tensor.shape[1], layer.in_features) if matrix.startswith("A") else (
                    tensor.shape[0],
                    layer.out_features,
                )
            elif isinstance(layer, torch.nn.Conv2d):
                size, expected = (tensor.shape[1], layer.in_channels) if matrix.startswith("A") else (
                    tensor.shape[0],
                    layer.out_channels,
                )
            else:
                size, expected = None, None
                problem = f"layer {module_name!r} is a {type(layer).__name__}, which LoRA cannot target"
            if problem is None and size != expected:
                problem = f"layer {module_name!r} has width {expected} but the LoRA expects {size}"
        if problem:
            raise ValueError(
                f"Bundle {source} does not fit this pipeline's UNet: it was made for base model "
                f"{base_model!r}, and {problem}. Load it on {base_model!r} (or a model of the same architecture)."
            )


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing bundles


@dataclass
class Bundle:
    """A bundle read from disk: its folder, config and UNet LoRA (diffusers naming)."""

    folder: Path
    config: ParrotConfig
    lora_state_dict: dict[str, torch.Tensor]
    lora_metadata: dict | None

    @property
    def has_expander(self) -> bool:
        return self.config.expander is not None

    def load_expander(self, torch_dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        try:
            return load_expander(
                self.folder / EXPANDER_FOLDER,
                base_model=self.config.expander.base_model,
                torch_dtype=torch_dtype,
                use_safetensors=True,
            )
        except Exception as error:  # any failure here is the bundle's: say which file set could not be read
            raise ValueError(
                f"Bundle {str(self.folder)!r}: could not load the expander from {EXPANDER_FOLDER}/ "
                f"(base model {self.config.expander.base_model!r}): {error}"
            ) from error


def read_bundle(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> Bundle:
    """Read and validate a bundle folder or Hub repo. Weight files in pickle formats are refused, never opened."""
    source = repr(str(path_or_repo_id))
    folder = local_folder(path_or_repo_id, what="Parrot bundle", allow_patterns=BUNDLE_FILES,
                          check_files=lambda files: _refuse_pickles(files, source), **hub_kwargs)  # fmt: skip
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(
            f"{source} is not a Parrot bundle: it has no {CONFIG_NAME}. A bundle is written by "
            f"`save_parrot_weights` or by training; for a plain LoRA use `load_lora_weights`."
        )
    _refuse_pickles([str(p.relative_to(folder)) for p in folder.rglob("*")], source)
    config = ParrotConfig.load(folder / CONFIG_NAME)
    if not (folder / LORA_WEIGHT_NAME).is_file():
        raise ValueError(f"Bundle {source} has no {LORA_WEIGHT_NAME}.")
    expander_folder = folder / EXPANDER_FOLDER
    if config.expander is not None and not expander_folder.is_dir():
        raise ValueError(f"Bundle {source}: {CONFIG_NAME} describes an expander but the {EXPANDER_FOLDER}/ folder is missing.")
    state_dict, _, metadata = StableDiffusionPipeline.lora_state_dict(
        str(folder), weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True
    )
    return Bundle(folder, config, state_dict, _lora_metadata_for_installed_peft(metadata, source))


def _refuse_pickles(files: list[str], source: str) -> None:
    """A bundle's files must all be safetensors or text: weight files in a pickle format are refused by name."""
    pickled = sorted(name for name in files if Path(name).suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"Bundle {source} holds weight files in a pickle format {pickled}; bundles must use .safetensors only "
            "(pickle files can run code when opened, so they are not read)."
        )


def _lora_metadata_for_installed_peft(metadata: dict | None, source: str) -> dict | None:
    """The LoRA's recorded LoraConfig (``unet.<field>`` keys) without the fields the installed peft lacks.

    Bundles written by parrot-pipeline 0.1 record every field of their peft's LoraConfig, each peft release adding
    some. A field the installed peft lacks is dropped when it is unset (None, False, empty) and refused otherwise,
    since the adapter would then differ from the one trained; ``peft_version`` only records the writer.
    """
    if metadata is None:
        return None
    known = {f.name for f in fields(LoraConfig)}
    kept, unsupported = {}, []
    for key, value in metadata.items():
        name = key.removeprefix(UNET_PREFIX)
        if name in known:
            kept[key] = value
        elif value and name != "peft_version":
            unsupported.append(f"{name}={value!r}")
    if unsupported:
        raise ValueError(
            f"Bundle {source}: its LoRA uses {', '.join(unsupported)}, which peft {peft.__version__} does not have; "
            "upgrade peft (`pip install -U peft`)."
        )
    return kept


def save_bundle(
    save_directory: str | os.PathLike,
    *,
    unet: UNet2DConditionModel,
    config: ParrotConfig,
    adapter_name: str | None = None,
    expander: PreTrainedModel | None = None,
    expander_tokenizer: PreTrainedTokenizerBase | None = None,
    card_sections: str = "",
    gallery: Sequence[tuple[str, str | os.PathLike]] = (),
    overwrite: bool = False,
) -> Path:
    """Write a bundle from the LoRA adapter on ``unet`` (and the expander, when given).

    ``gallery`` is ``(caption, image file)`` pairs copied into ``samples/`` and shown in the model card's gallery.

    The folder is built under a temporary name beside ``save_directory`` and renamed at the end, so a failure never
    leaves a half-written bundle. An existing non-empty ``save_directory`` is replaced only with ``overwrite=True``.
    """
    target = Path(save_directory)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"`save_directory` {str(target)!r} already exists; pass overwrite=True to replace it.")
    adapter_name = adapter_name or single_adapter_name(unet)
    if (expander is None) != (config.expander is None):
        raise ValueError("Pass both `expander` and a config with `expander` settings, or neither.")
    state_dict, lora_config = unet_lora_state_dict(unet, adapter_name)
    bad = [key for key, value in state_dict.items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"Refusing to write a LoRA with non-finite values (e.g. in {bad[0]!r}).")

    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(
            building,
            unet_lora_layers={key[len(UNET_PREFIX) :]: value for key, value in state_dict.items()},
            unet_lora_adapter_metadata=lora_config,
            weight_name=LORA_WEIGHT_NAME,
        )
        save_file(diffusers_to_kohya(state_dict, lora_config), building / KOHYA_WEIGHT_NAME)
        if expander is not None:
            expander.save_pretrained(building / EXPANDER_FOLDER, safe_serialization=True)
            expander_tokenizer.save_pretrained(building / EXPANDER_FOLDER)
        if gallery:
            (building / GALLERY_FOLDER).mkdir()
            entries = []
            for caption, image in gallery:
                name = f"{GALLERY_FOLDER}/{Path(image).name}"
                shutil.copyfile(image, building / name)
                entries.append({"text": caption, "image": name})
            config = replace(config, extra={**config.extra, "gallery": entries})
        (building / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        (building / PIPELINE_FILE).write_text(BUNDLE_PIPELINE_SOURCE, encoding="utf-8")
        write_model_card(building, config, extra_sections=card_sections)
        _replace_folder(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def single_adapter_name(unet: UNet2DConditionModel) -> str:
    names = list(getattr(unet, "peft_config", {}) or {})
    if len(names) != 1:
        raise ValueError(
            f"The UNet has {len(names)} LoRA adapters {names}; pass `adapter_name` to choose the one to save."
            if names
            else "The UNet has no LoRA adapter to save; add one with `unet.add_adapter(LoraConfig(...))` or load one."
        )
    return names[0]


def _replace_folder(new: Path, target: Path) -> None:
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, retired)
        os.rename(new, target)
        shutil.rmtree(retired)
    else:
        os.rename(new, target)


# ---------------------------------------------------------------------------------------------------------------
# Model card and Hub


def _hub_id(name: str) -> str | None:
    """``name`` when it is a Hub repo id rather than a local path, else None."""
    if os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except ValueError:
        return None
    return name if "/" in name else None


def write_model_card(folder: str | os.PathLike, config: ParrotConfig, repo_id: str | None = None, extra_sections: str = "") -> None:
    """Write the bundle's ``README.md`` (Hub model card). The access token is never part of it."""
    base = _hub_id(config.base_model)
    base_text = base or "<base model>"
    bundle_ref = repo_id or "path/to/this/bundle"
    rewards = "\n".join(
        f"| {k + 1} | `{name}` | `{identifier}` |"
        for k, (name, identifier) in enumerate(
            zip(config.reward_names, config.reward_identifiers or ["(none)"] * len(config.reward_names))
        )
    )
    data = ModelCardData(
        base_model=base,
        library_name="diffusers",
        tags=["text-to-image", "lora", "stable-diffusion", "parrot", f"method-{config.method}"],
        widget=[{"text": entry["text"], "output": {"url": entry["image"]}} for entry in config.extra.get("gallery", [])]
        or None,
    )
    expander_line = (
        f"a prompt expander (`{config.expander.base_model}` with a LoRA adapter or fine-tuned weights), "
        if config.expander
        else ""
    )
    content = f"""---
{data.to_yaml()}
---

# Parrot bundle for `{config.base_model}`

Trained with **{config.method}** ({METHOD_DESCRIPTIONS[config.method]}).
This bundle holds a UNet LoRA, {expander_line}and the settings in `{CONFIG_NAME}`.

| k | reward | identifier |
|---|---|---|
{rewards}

Default guidance: `guidance_scale` (original prompt) = {config.guidance_scale},
`expansion_guidance_scale` (expanded prompt) = {config.expansion_guidance_scale}.

## Use in diffusers

```python
import torch
from parrot_pipeline import ParrotPipeline   # pip install parrot-pipeline

pipe = ParrotPipeline.from_pretrained("{base_text}", torch_dtype=torch.float16).to("cuda")
pipe.load_parrot_weights("{bundle_ref}")
out = pipe("a cat on a windowsill")
out.images[0].save("cat.png")
print(out.expanded_prompts[0])
```

Through diffusers' custom-pipeline route:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_text}", custom_pipeline="{bundle_ref}", trust_remote_code=True)
pipe.load_parrot_weights("{bundle_ref}")
```

The UNet LoRA alone (no prompt expansion, plain guidance) loads with stock diffusers:
`StableDiffusionPipeline.from_pretrained("{base_text}").load_lora_weights("{bundle_ref}")`.

## Use in ComfyUI

`{KOHYA_WEIGHT_NAME}` is the LoRA in kohya naming: put it in `ComfyUI/models/loras/` and load it with
`LoraLoaderModelOnly`, or use the Parrot nodes of parrot-pipeline for expansion and original-prompt-centred guidance.
"""
    if extra_sections:
        content += f"\n{CARD_EXTRA_MARKER}\n{extra_sections}"
    ModelCard(content).save(Path(folder) / CARD_FILE)


def push_bundle_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload Parrot bundle",
    attempts: int = 3,
    retry_wait: float = 5.0,
) -> str:
    """Upload a bundle folder to a Hub model repo (created if needed); returns the commit URL.

    ``token`` defaults to the usual ``HF_TOKEN`` / ``hf auth login`` credentials; it is never printed or written.
    Network errors, 429 and 5xx answers are retried up to ``attempts`` times in all, waiting ``retry_wait``
    seconds, then twice that, and so on; other HTTP errors (a bad token, no write access) are raised at once.
    """
    bundle = read_bundle(folder)
    validate_repo_id(repo_id)  # before the card names it
    with tempfile.TemporaryDirectory() as scratch:  # the card that names the repo; the bundle folder stays as it is
        write_model_card(scratch, bundle.config, repo_id=repo_id, extra_sections=_card_extra(bundle.folder))
        card = (Path(scratch) / CARD_FILE).read_bytes()
    return upload_folder_to_hub(bundle.folder, repo_id, private=private, token=token, commit_message=commit_message,
                                attempts=attempts, retry_wait=retry_wait, replacing={CARD_FILE: card})  # fmt: skip


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload model",
    attempts: int = 3,
    retry_wait: float = 5.0,
    replacing: dict[str, bytes] | None = None,
) -> str:
    """Upload a folder to a Hub model repo (created if needed), in one commit, with :func:`push_bundle_to_hub`'s
    retries; returns the commit URL. ``replacing`` maps paths in the repo to the content they get instead of the
    folder's file (the folder itself is only read)."""
    validate_repo_id(repo_id)
    replacing = replacing or {}
    folder = Path(folder)
    files = {file.relative_to(folder).as_posix(): file for file in sorted(folder.rglob("*")) if file.is_file()}
    api = HfApi(token=token)
    for attempt in range(1, attempts + 1):
        # fresh operations for each attempt: an attempt records its upload state in them
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(file))
                      for name, file in files.items() if name not in replacing]  # fmt: skip
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in replacing.items()]
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                                       commit_message=commit_message)  # fmt: skip
            return str(commit.commit_url)
        except Exception as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if attempt == attempts or (status is not None and status < 500 and status != 429):
                raise
            wait = retry_wait * 2 ** (attempt - 1)
            logger.warning("Upload to %s failed (%s: %s); retrying in %.0f s.", repo_id, type(error).__name__, error, wait)
            time.sleep(wait)


def _card_extra(folder: Path) -> str:
    """The sections a bundle's card carries after the standard ones (kept when the card is rewritten)."""
    card = (folder / CARD_FILE).read_text(encoding="utf-8") if (folder / CARD_FILE).is_file() else ""
    return card.split(CARD_EXTRA_MARKER + "\n", 1)[1] if CARD_EXTRA_MARKER in card else ""
