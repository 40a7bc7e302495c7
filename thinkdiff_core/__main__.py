"""ThinkDiff without ComfyUI: run the example (demo), generate images, evaluate on CoBSAT, measure reasoning
speed (bench), prepare data for and train aligners, convert aligner checkpoints, extract BLIP-2's vision tower
and write tiny random models. Each command has its own --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import CommandParser, DefaultsFormatter, register_all, unrecognized


def main(argv: list[str] | None = None) -> int:
    # As the user typed it: the `thinkdiff` command of `pip install .`, or the module.
    prog = "thinkdiff" if Path(sys.argv[0]).stem == "thinkdiff" else "python -m thinkdiff_core"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=DefaultsFormatter)
    try:
        commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
        register_all(commands)  # imports torch: Ctrl-C-able too
        # A mistyped option is the subcommand's mistake: its usage and the error (exit 2), not the top level's.
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            command = commands.choices[args.command]
            command.error(unrecognized(command, unknown))
        args.run(args)
    # Ctrl-C: one line and the shell's exit status for SIGINT, no traceback. A long command re-raises it as
    # KeyboardInterrupt("interrupted ...; <what is kept>; <how to resume>"); a bare one says only that.
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    # ImportError: an optional dependency an option needs (bitsandbytes for --quantize); PermissionError: an
    # --out the user may not write to.
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
