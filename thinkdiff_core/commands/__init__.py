"""The programs built on the method, one module per command of `python -m thinkdiff_core`.

Each command module owns its argument parser (`register(commands)`, which adds the subcommand and sets
`run`) and its entry point (`run(args)`). Two modules serve commands without being one: `cobsat_judge`
(CoBSAT's local VLM judge) and `training_data` (the image sources and prepared shards that prepare-lvlm
and train read). The method they use lives one level up, in `thinkdiff_core`; nothing there imports from
here.
"""

from __future__ import annotations

import argparse
from importlib import import_module

# In the order `--help` lists them; the subcommand is the module's name with "-" for "_".
COMMANDS = ("demo", "generate", "cobsat", "bench", "prepare_lvlm", "train", "convert", "extract_vision",
            "make_tiny_models")


def register_all(commands: argparse._SubParsersAction) -> None:
    for name in COMMANDS:
        import_module(f".{name}", __name__).register(commands)
