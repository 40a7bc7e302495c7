"""ThinkDiff without ComfyUI: run the example (demo), generate images, evaluate on CoBSAT, measure reasoning
speed (bench), prepare data for and train aligners, convert aligner checkpoints, extract BLIP-2's vision tower
and write tiny random models. Each command has its own --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import register_all


def main(argv: list[str] | None = None) -> int:
    # As the user typed it: the `thinkdiff` command of `pip install .`, or the module.
    prog = "thinkdiff" if Path(sys.argv[0]).stem == "thinkdiff" else "python -m thinkdiff_core"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    register_all(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    # ImportError: an optional dependency an option needs (bitsandbytes for --quantize).
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
