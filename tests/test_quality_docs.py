"""Every ``python examples/quality.py ...`` command in docs/quality.md still parses: the doc promises that each
number comes with the command that reproduces it, so a renamed or removed flag must fail here, not on a GPU."""
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

PREFIX = "python examples/quality.py"


def documented_commands() -> list[str]:
    lines = (ROOT / "docs" / "quality.md").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith(PREFIX)]


def command_argv(command: str) -> list[str]:
    """The arguments after the script name, with shell variables and the ``$(python -c ...)`` path list
    replaced by placeholder paths and optional-part brackets (``[--flag value]``) dropped."""
    command = re.sub(r"\$\(python -c .*\)", "/tmp/site-packages", command)
    command = command.replace("$OUT", "/tmp/out").replace("$EX", "/tmp/site-packages")
    command = command.replace("[", " ").replace("]", " ")
    return shlex.split(command)[len(PREFIX.split()):]


def test_doc_has_commands():
    assert len(documented_commands()) >= 10


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_parses(command):
    import quality

    args = quality.parse_args(command_argv(command))
    assert args.out.startswith("/tmp/out")


def test_unknown_flag_is_rejected():
    import quality

    with pytest.raises(SystemExit):
        quality.parse_args(command_argv(PREFIX + " --out $OUT/q --no-such-flag 3"))
