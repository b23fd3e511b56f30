"""``python -m train --config FILE [key=value ...]``: run multi-reward RL (parrot, dpok or ddpo mode)."""

from __future__ import annotations

import argparse
import sys

from .config import load_config
from .parrot import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", help="a YAML preset from configs/ (or your own)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the preset's")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, TypeError, OSError) as error:
        parser.exit(2, f"python -m train: error: {error}\n")
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
