"""Every command in the docs that runs a research harness (``python -m research.<name> ...``) still parses, and
no doc points at a harness's old place: the docs promise that each number comes with the command that
reproduces it, so a renamed or removed flag must fail here, not on a GPU."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "research").glob("*.md"))]
COMMAND = re.compile(r"python3? -m research\.(\w+)([^`\n]*)")
HARNESSES = ("quality", "selection_align", "selection_probe", "copy_check", "nsa_finetune_check", "grad_check",
             "measure_fallback")


def documented_commands() -> list[tuple[str, str, str]]:
    """``(doc, module, arguments)`` for every harness command quoted in a doc (code blocks and inline code)."""
    found = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            found += [(doc.relative_to(ROOT).as_posix(), m[1], m[2]) for m in COMMAND.finditer(line)]
    return found


def command_argv(arguments: str) -> list[str]:
    """The arguments after the module name, with shell variables and the ``$(python -c ...)`` path list
    replaced by placeholder paths and optional-part brackets (``[--flag value]``) dropped."""
    arguments = re.sub(r"\$\(python -c .*\)", "/tmp/site-packages", arguments)
    arguments = arguments.replace("$OUT", "/tmp/out").replace("$EX", "/tmp/site-packages")
    arguments = arguments.replace("[", " ").replace("]", " ")
    return shlex.split(arguments, comments=True)


def test_docs_quote_the_harness_commands():
    commands = documented_commands()
    quoted_in = {doc for doc, _, _ in commands}
    assert {"docs/quality.md", "research/RUNS.md", "research/README.md", "docs/fallback.md"} <= quoted_in
    assert sum(doc == "research/RUNS.md" for doc, _, _ in commands) >= 25  # the run log's commands


@pytest.mark.parametrize("doc, module, arguments", documented_commands())
def test_documented_command_parses(doc, module, arguments):
    argv = command_argv(arguments)
    assert not any("$" in a for a in argv), argv  # a shell variable the placeholders do not cover
    importlib.import_module(f"research.{module}").parse_args(argv)


def test_unknown_flag_is_rejected():
    from research import quality

    with pytest.raises(SystemExit):
        quality.parse_args(command_argv(" --out $OUT/q --no-such-flag 3"))


def test_no_doc_points_at_the_old_harness_paths():
    old = re.compile(r"examples/(%s)\.py|tests/test_(quality_example|quality_docs|selection_probe|selection_align)"
                     % "|".join(HARNESSES))
    stale = [(doc.relative_to(ROOT).as_posix(), line.strip()) for doc in DOCS
             for line in doc.read_text().splitlines() if old.search(line)]
    assert not stale, stale
