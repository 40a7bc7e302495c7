"""The command line's manners: defaults in --help, a misspelt option named with its command's usage, where each
command's outputs are, answers printed without control characters, no third-party noise."""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from thinkdiff_core.__main__ import main
from thinkdiff_core.commands import CommandParser, DefaultsFormatter, register_all
from thinkdiff_core.commands.generate import printable

MODULE_PROG = "/repo/thinkdiff_core/__main__.py"  # sys.argv[0] of `python -m thinkdiff_core`


def parsers():
    """The top-level parser and each command's, built as main() builds them."""
    top = argparse.ArgumentParser(prog="python -m thinkdiff_core", formatter_class=DefaultsFormatter)
    commands = top.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    register_all(commands)
    return top, commands.choices


def shown_help(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: no default cut by wrapping
    monkeypatch.setattr(sys, "argv", [MODULE_PROG])
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command, shown", [
    ("bench", ["--tokens TOKENS       tokens decoded per run (default: 128)", "(default: 3)",
               "(default: generate fast fast_compiled)", "(default: 612)"]),
    ("train", ["the paper's 40 epochs x 5000 steps (default: 200000)", "(default: 0.0001)", "(default: 2000)",
               "(default: 42)", "(default: 32 for lvlm, 42 for clip)"]),
    ("demo", ["FLUX steps (default: 28)", "FLUX guidance (default: 3.5)", "(default: demo_output)",
              "(default: lvlm)"]),
    ("generate", ["FLUX steps (default: 28)", "(default: 0.6)", "(default: 0.9)", "(default: 128)",
                  "one image per seed (default: 0)", "(default: generate_output)"]),
    ("cobsat", ["(default: 2)", "(default: 512)", "(default: cobsat_output)", "(default: all)"]),
    ("prepare-lvlm", ["(default: 256)", "(default: 0)"]),
    ("make-tiny-models", ["the random weights' seed (default: 0)"]),
])
def test_help_shows_the_defaults(command, shown, capsys, monkeypatch):
    help = shown_help([command], capsys, monkeypatch)
    for text in shown:
        assert text in help
    assert "(default: None)" not in help and "(default: False)" not in help and "(default: [])" not in help


def test_every_option_with_a_default_says_it_in_help():
    """Not only the options above: any option of any command with a default that means something."""
    top, commands = parsers()
    for name, parser in [("(top level)", top), *commands.items()]:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "", [], argparse.SUPPRESS):
                assert action.help, f"{name} {action.option_strings[0]}: no help text to show its default in"
                assert "(default: " in formatter._expand_help(action), (name, action.dest)


def test_a_misspelt_option_is_the_commands_mistake(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [MODULE_PROG])
    with pytest.raises(SystemExit) as exit:
        main(["train", "--variant", "lvlm", "--t5", "t5", "--data", "data", "--out", "out", "--step", "5"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m thinkdiff_core train [-h] --variant {lvlm,clip}")
    assert err.splitlines()[-1] == ("python -m thinkdiff_core train: error: unrecognized arguments: --step 5 "
                                    "(did you mean --steps?)")
    with pytest.raises(SystemExit) as exit:  # nothing near it: no suggestion
        main(["demo", "--frobnicate"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("usage: python -m thinkdiff_core demo [-h]")
    assert err.splitlines()[-1] == "python -m thinkdiff_core demo: error: unrecognized arguments: --frobnicate"
    with pytest.raises(SystemExit):  # --opt=value spelling too
        main(["bench", "--token=3"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("unrecognized arguments: --token=3 (did you mean "
                                                             "--tokens?)")


def test_answers_are_printed_without_control_characters():
    answer = "a red car\x1b[2J\rover\x07\x00 it\x7f\x85\x9b\nline two\tend é ✓"
    assert printable(answer) == "a red car\\x1b[2J\\x0dover\\x07\\x00 it\\x7f\\x85\\x9b\nline two\tend é ✓"
    assert printable("plain text\n") == "plain text\n"


def test_convert_ends_with_the_aligner_it_wrote(tiny_models, tmp_path, capsys):
    import json

    out = tmp_path / "aligner.safetensors"
    assert main(["convert", str(tiny_models["aligner"]), str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["output_bytes"] == out.stat().st_size  # stdout: the JSON report alone
    assert captured.err.splitlines()[-1] == f"aligner: {out}"


def test_extract_vision_ends_with_the_file_it_wrote(tiny_models, tmp_path, capsys):
    out = tmp_path / "blip2_vision.safetensors"
    assert main(["extract-vision", str(tiny_models["blip2"]), str(out)]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"vision: {out}" and out.is_file()


def test_make_tiny_models_ends_with_the_folder(tmp_path, capsys, monkeypatch):
    from thinkdiff_core.commands import make_tiny_models

    monkeypatch.setattr(make_tiny_models, "make_tiny_models",
                        lambda folder, seed: {"vlm": Path(folder) / "vlm"})
    assert main(["make-tiny-models", str(tmp_path / "tiny")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"vlm: {tmp_path / 'tiny' / 'vlm'}",
                     f"models: {tmp_path / 'tiny'} (demo --models-dir {tmp_path / 'tiny'} runs on them)"]


def test_bitsandbytes_missing_cpu_kernel_warning_is_dropped_and_nothing_else(caplog):
    import thinkdiff_core  # noqa: F401 - installs the filter
    from thinkdiff_core.reason import BITSANDBYTES_CPU_LOGGER, quiet_bitsandbytes_cpu_kernel_warning

    quiet_bitsandbytes_cpu_kernel_warning()  # idempotent: one filter, however often
    cpu_logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    assert len(cpu_logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        # As bitsandbytes 0.50 (backends/cpu/ops.py) logs it at import.
        cpu_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                           "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        cpu_logger.warning("another bitsandbytes warning")
        logging.getLogger("bitsandbytes.other").warning("Failed to load CPU gemm_4bit_forward elsewhere")
    assert [record.getMessage() for record in caplog.records] == [
        "another bitsandbytes warning", "Failed to load CPU gemm_4bit_forward elsewhere"]


@pytest.mark.slow
def test_importing_bitsandbytes_after_the_pack_prints_no_kernel_warning():
    """The real import (the warning appears on CPUs with AVX-512 BF16 and without the `kernels` package)."""
    pytest.importorskip("bitsandbytes")
    result = subprocess.run([sys.executable, "-c", "import thinkdiff_core, bitsandbytes"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr
