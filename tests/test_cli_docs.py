"""docs/cli.md is generated from the argparse definitions; the committed file must be current."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_cli_reference_is_up_to_date():
    gen = _generator()
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), (
        "docs/cli.md is out of date: run python scripts/gen_cli_docs.py"
    )


def _walk(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def test_every_subcommand_and_option_is_documented():
    from vramplan.cli import build_parser

    text = _generator().render()
    for path, parser in _walk(build_parser(), "vramplan"):
        assert f"`{path}`" in text, path
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in text, f"{path} {flag}"


def test_a_command_word_builds_its_own_parser_and_only_it():
    """build_parser(argv) adds only the named command (a cold estimate imports no planner or
    plot code): every name in COMMAND_NAMES is the one its module registers, in COMMANDS' order,
    and that command's parser is the same as in the whole parser."""
    from vramplan.cli import COMMAND_NAMES, build_parser

    whole = {name: child for name, child in _walk(build_parser(), "vramplan")}
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(top.choices) == COMMAND_NAMES
    for name in COMMAND_NAMES:
        own = dict(_walk(build_parser([name, "--help"]), "vramplan"))
        assert set(own) == {"vramplan"} | {p for p in whole if p.split(" ")[1:2] == [name]}
        for path, parser in own.items():
            if path != "vramplan":
                assert parser.format_help() == whole[path].format_help(), path
