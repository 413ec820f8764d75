"""docs/cli.md is generated from the command line's parser (docs/gen_cli.py): it must match what the parser says now."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_current():
    gen = _gen_cli()
    assert gen.CLI_MD.read_text() == gen.render(), f"docs/cli.md is stale: regenerate it with `{gen.REGENERATE}`"


def test_cli_md_lists_every_command_and_flag():
    from forvalue_ray.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert f"## `forvalue-ray {name}`" in text
        for action in parser._actions:
            for flag in action.option_strings if action.dest != "help" else ():
                assert f"`{flag}`" in text, (name, flag)
