"""``python -m train --config FILE [--resume] [key=value ...]``: run multi-reward RL (parrot, dpok or ddpo mode).

Exits with 1 when the run finished but its Hub upload failed (the bundle is kept locally), and with 128 + N when
signal N stopped it after writing a checkpoint."""

from __future__ import annotations

import argparse
import sys

from .config import load_config
from .parrot import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", help="a YAML preset from configs/ (or your own)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (resume=true)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the preset's")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, [*args.overrides, *(["resume=true"] if args.resume else [])])
    except (ValueError, TypeError, OSError) as error:
        parser.exit(2, f"python -m train: error: {error}\n")
    results = train(config)
    return 1 if "error" in results.get("hub", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
