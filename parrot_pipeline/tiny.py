"""Tiny offline components with the shapes of the real ones, for tests, benchmarks and the quickstart.

Everything is built from configs with fixed seeds and saved with ``save_pretrained``, so callers go through the real
``from_pretrained(local_dir)`` path and nothing is downloaded. The tokenizers are byte-level BPEs whose merges spell
out a small vocabulary of prompt words, so common words are single tokens as they are in the real tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TINY_VERSION = "v1"
CACHE_ENV = "PARROT_PIPELINE_CACHE"
BUILD_WAIT_SECONDS = 600

WORDS = """
a an the of in on at with and or by for from to into under over near behind beside above below its their his her
photo picture painting drawing sketch render illustration portrait landscape closeup close up view shot scene image
cat dog bird horse fox owl wolf bear lion tiger rabbit deer fish whale dolphin turtle frog butterfly dragon robot
man woman child girl boy people person astronaut knight wizard king queen chef farmer sailor musician dancer
house castle city street village tower bridge road garden forest mountain mountains river lake sea ocean beach
desert island field meadow valley sky cloud clouds sun moon stars night morning sunset sunrise rain snow storm fog
tree trees flower flowers rose grass leaves rock stone water fire light shadow window door room kitchen library
car train boat ship bicycle plane rocket book cup table chair lamp clock guitar piano hat coat umbrella
red orange yellow green blue purple pink white black gray golden silver brown dark bright colorful vivid pastel
big small tiny huge old young happy sad calm cozy quiet busy ancient modern futuristic magical mysterious beautiful
cute majestic peaceful dramatic epic serene warm cold soft sharp glowing shiny wet misty sunny snowy rainy
sitting standing running flying walking swimming reading playing eating sleeping dancing singing looking holding
highly detailed intricate detail details high quality resolution best masterpiece award winning professional
trending artstation digital art concept oil watercolor pencil ink style cinematic lighting volumetric studio soft
natural golden hour hdr 4k 8k sharp focus depth field bokeh octane unreal engine smooth elegant fantasy realistic
photorealistic hyperrealistic stunning gorgeous atmospheric moody vibrant colors composition wide angle lens
by greg rutkowski artgerm alphonse mucha makoto shinkai studio ghibli
reward Input Output This is text input output image generation expand prompt improving quality
""".split()


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Segment one word the way a BPE tokenizer does: always apply the lowest-ranked merge present."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _bpe_merges(words: list[str], word_start: str = "", word_end: str = "") -> list[tuple[str, str]]:
    """Merges under which BPE turns every listed word into a single token."""
    byte_encoder = bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        symbols = [byte_encoder[b] for b in (word_start + word).encode()]
        symbols[-1] += word_end
        segments = _bpe(symbols, ranks)
        while len(segments) > 1:
            ranks[(segments[0], segments[1])] = len(ranks)
            segments = _bpe(symbols, ranks)
    return list(ranks)


def _vocab(base_units: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    tokens = list(dict.fromkeys([*base_units, *("".join(pair) for pair in merges), *specials]))
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer_from_files(cls, vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs):
    """A BPE tokenizer read from ``vocab.json`` and ``merges.txt``, the files every transformers release reads
    (an in-memory vocabulary needs transformers 5)."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
        Path(folder, "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return cls.from_pretrained(folder, **kwargs)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    units = list(bytes_to_unicode().values())
    merges = _bpe_merges(WORDS, word_end="</w>")
    vocab = _vocab(units + [u + "</w>" for u in units], merges, ["<|startoftext|>", "<|endoftext|>"])
    return _tokenizer_from_files(CLIPTokenizer, vocab, merges, model_max_length=77)


def tiny_gpt2_tokenizer() -> GPT2Tokenizer:
    units = list(bytes_to_unicode().values())
    merges = _bpe_merges(WORDS, word_start=" ") + _bpe_merges(WORDS)
    vocab = _vocab(units, merges, ["<|endoftext|>"])
    tokenizer = _tokenizer_from_files(GPT2Tokenizer, vocab, merges, model_max_length=256)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_pipeline_components(
    seed: int = 0,
    prediction_type: str = "epsilon",
    cross_attention_dim: int = 32,
) -> dict:
    """Components of a Stable-Diffusion-shaped pipeline (~1.4M-parameter UNet, 8× VAE, CLIP text encoder).

    ``prediction_type="v_prediction"`` gives the SD 2.x flavour. 64×64 images use 8×8 latents.
    """
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def sd15_components(dtype: torch.dtype = torch.float32) -> dict:
    """Stable Diffusion 1.5's exact UNet, VAE and text encoder (CLIP ViT-L/14) configurations with random weights,
    in ``dtype``, and a DDIM scheduler: the full-size model's cost (benchmarks on a GPU) and its checkpoint layout
    (ComfyUI's model detection), without its weights. The tokenizer is the tiny one: only prompt text goes through it.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    return {
        "vae": vae.to(dtype),
        "text_encoder": text_encoder.to(dtype),
        "tokenizer": tiny_clip_tokenizer(),
        "unet": unet.to(dtype),
        "scheduler": DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def tiny_expander(seed: int = 0) -> tuple[GPT2LMHeadModel, GPT2Tokenizer]:
    """A GPT-2-shaped causal LM (2 layers, width 64) and its tokenizer, randomly initialised."""
    tokenizer = tiny_gpt2_tokenizer()
    torch.manual_seed(seed + 3)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Untrained, it would emit word fragments; limiting it to whole words keeps its expansions readable.
    allowed = {tokenizer.convert_tokens_to_ids(token) for token in ("Ġ" + word for word in WORDS)}
    allowed |= {tokenizer.convert_tokens_to_ids(token) for token in (",", tokenizer.eos_token)}
    model.generation_config.suppress_tokens = sorted(set(range(len(tokenizer))) - allowed)
    return model, tokenizer


def save_tiny_pipeline(directory: str | os.PathLike, **kwargs) -> Path:
    """Build the tiny pipeline (see ``tiny_pipeline_components``) and ``save_pretrained`` it to ``directory``."""
    StableDiffusionPipeline(**tiny_pipeline_components(**kwargs)).save_pretrained(directory)
    return Path(directory)


def save_tiny_expander(directory: str | os.PathLike, seed: int = 0) -> Path:
    model, tokenizer = tiny_expander(seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "parrot_pipeline"))


def _build_once(target: Path, build) -> Path:
    """Run ``build(folder)`` in a temporary folder renamed to ``target``, unless ``target`` already exists, so
    concurrent or interrupted builds never leave a partial model. The build seeds torch itself; the caller's RNG
    state is left as it was, so a run is the same whether or not it built the cache.

    In a process group only rank 0 builds: transformers' ``save_pretrained`` silently writes nothing on the other
    ranks, which wait for rank 0's folder instead."""
    if target.is_dir():
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return _wait_for_build(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            build(building)
        os.rename(building, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _wait_for_build(target: Path) -> Path:
    deadline = time.monotonic() + BUILD_WAIT_SECONDS
    while not target.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Waited {BUILD_WAIT_SECONDS} s for process 0 to build {target}. On several machines, point "
                f"{CACHE_ENV} at a folder all of them share, or run once on one process to build it."
            )
        time.sleep(0.5)
    return target


def default_tiny_model() -> Path:
    """The embedded default model: the tiny pipeline with a tiny expander, built once into the cache folder."""
    from .pipeline_parrot import ParrotPipeline

    def build(folder: Path) -> None:
        expander, expander_tokenizer = tiny_expander()
        ParrotPipeline(
            **tiny_pipeline_components(), expander=expander, expander_tokenizer=expander_tokenizer
        ).save_pretrained(folder)

    return _build_once(cache_dir() / f"tiny-parrot-sd-{TINY_VERSION}", build)


def default_tiny_expander() -> Path:
    """The tiny expander (model and tokenizer in one folder, as ``load_expander`` takes it), built once."""
    return _build_once(cache_dir() / f"tiny-expander-{TINY_VERSION}", save_tiny_expander)
