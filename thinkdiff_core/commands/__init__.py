"""The programs built on the method, one module per command of `python -m thinkdiff_core`.

Each command module owns its argument parser (`register(commands)`, which adds the subcommand and sets
`run`) and its entry point (`run(args)`). Two modules serve commands without being one: `cobsat_judge`
(CoBSAT's local VLM judge) and `training_data` (the image sources and prepared shards that prepare-lvlm
and train read). The method they use lives one level up, in `thinkdiff_core`; nothing there imports from
here.
"""

from __future__ import annotations

import argparse
import difflib
from importlib import import_module

# In the order `--help` lists them; the subcommand is the module's name with "-" for "_".
COMMANDS = ("demo", "generate", "cobsat", "bench", "prepare_lvlm", "train", "convert", "extract_vision",
            "make_tiny_models")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, "(default: 128)"; not where the default means "not given" (None,
    False, an empty list: the help text says what happens then) or the help already names it."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
                or "%(default)" in help or "(default" in help):
            return help
        if isinstance(default, (list, tuple)):  # as typed: --paths generate fast, not ['generate', 'fast']
            return f"{help} (default: {' '.join(map(str, default)).replace('%', '%%')})"
        return f"{help} (default: %(default)s)"


class RawDescriptionDefaultsFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsFormatter, with the description's line breaks kept (a table of what a command writes)."""


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its --help shows the defaults, and options are spelt out (an abbreviation such as
    `--step` for `--steps` is a mistake reported with the subcommand's usage, not silently taken)."""

    def __init__(self, *args, formatter_class=DefaultsFormatter, allow_abbrev=False, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, allow_abbrev=allow_abbrev, **kwargs)


def unrecognized(parser: argparse.ArgumentParser, arguments: list[str]) -> str:
    """argparse's "unrecognized arguments: ..." message, with the nearest option of `parser` for a misspelt one."""
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    near = [match for argument in arguments if argument.startswith("--")
            for match in difflib.get_close_matches(argument.split("=", 1)[0], options, n=1)]
    hint = f" (did you mean {' or '.join(dict.fromkeys(near))}?)" if near else ""
    return f"unrecognized arguments: {' '.join(arguments)}{hint}"


def register_all(commands: argparse._SubParsersAction) -> None:
    for name in COMMANDS:
        import_module(f".{name}", __name__).register(commands)
