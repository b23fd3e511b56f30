"""``parrot-generate``: generate an image with ParrotPipeline from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .bundle import check_scale
from .pipeline_parrot import ParrotPipeline
from .tiny import default_tiny_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parrot-generate",
        description="Generate images with prompt expansion and original-prompt-centred guidance.",
    )
    parser.add_argument(
        "--model", help="base model: a diffusers folder or Hub id (default: the tiny embedded model, runs anywhere)"
    )
    parser.add_argument("--bundle", help="a Parrot bundle folder or Hub id to load on the model")
    parser.add_argument("--expander", help="a causal LM folder or Hub id to expand prompts with (no bundle needed)")
    parser.add_argument("--prompt", required=True, help="the prompt")
    parser.add_argument("--negative-prompt", help="replaces the empty prompt of the unconditional branch")
    parser.add_argument("--expanded-prompt", help="use this expansion verbatim instead of running the expander")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds both the expansion and the image (default 0)")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("parrot.png"), help="output image path (default parrot.png)")
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``python -m train.evaluate``; ``check_sampling_arguments`` checks them."""
    parser.add_argument(
        "--guidance-scale", type=float, help="w1, on the original prompt (default: the bundle's, else 5)"
    )
    parser.add_argument(
        "--expansion-guidance-scale",
        type=float,
        help="w2, on the expanded prompt; 0 = plain CFG (default: the bundle's, else 5)",
    )
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's)")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's)")


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """Ranges of the sampling flags, checked before any model loads."""
    if args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}.")
    scales = {"--guidance-scale": args.guidance_scale, "--expansion-guidance-scale": args.expansion_guidance_scale}
    for flag, value in scales.items():
        if value is not None:
            check_scale(flag, value)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"{flag} must be a positive multiple of 8, got {value}.")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N…")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="weights and activations of the pipeline (default float32)")  # fmt: skip


def resolve_device(name: str) -> str:
    """``--device`` as a torch device name; asking for CUDA where there is none fails before any model loads."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available; use --device cpu or auto.")
    return name


def load_pipeline(
    model: str | None, bundle: str | None, device: str, dtype: str, expander: str | None = None, **kwargs
) -> ParrotPipeline:
    """The pipeline of ``model`` (default: the tiny embedded one) with an expander and a bundle loaded, on
    ``device``; ``kwargs`` go to ``from_pretrained``."""
    pipe = ParrotPipeline.from_pretrained(model or default_tiny_model(), torch_dtype=getattr(torch, dtype), **kwargs)
    if expander:
        pipe.load_expander(expander)
    if bundle:
        pipe.load_parrot_weights(bundle)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        parser.error(f"--out must end in .png, .jpg, .jpeg or .webp, got {args.out}")
    try:
        check_sampling_arguments(args)
        args.device = resolve_device(args.device)
        generate(args)
    except (ValueError, TypeError, OSError) as error:
        parser.exit(2, f"parrot-generate: error: {error}\n")
    return 0


def generate(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.model, args.bundle, args.device, args.dtype, expander=args.expander)

    out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        expanded_prompt=args.expanded_prompt,
        guidance_scale=args.guidance_scale,
        expansion_guidance_scale=args.expansion_guidance_scale,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    print(f"prompt:          {args.prompt}")
    print(f"expanded prompt: {out.expanded_prompts[0] if out.expanded_prompts else '(none: plain guidance)'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(args.out)
    print(f"image:           {args.out}")


if __name__ == "__main__":
    sys.exit(main())
