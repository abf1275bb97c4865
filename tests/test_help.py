"""`--help` of every command: plain placeholders, help text on every option and argument."""
import re

import typer
from typer.testing import CliRunner

from onnx_excite.cli.app import app

runner = CliRunner()


def _commands(group, path=()):
    """(command path, click command) for every command and sub-command of the app."""
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, path + (name,))


def test_every_command_help_is_plain_and_complete():
    root = typer.main.get_command(app)
    seen = 0
    for path, cmd in _commands(root):
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (path, res.output)
        text = res.output
        assert "<bool>" not in text and not re.search(r"<(str|int|float|path|list\[[^]]*\])>", text), (path, text)
        assert not re.search(r"\{[a-z_]+\}", text), (path, text)            # no {model}-style usage
        flat = re.sub(r"\s+", "", text)    # wrapping may break lines anywhere, even at hyphens
        for param in cmd.params:
            if param.name == "help":
                continue
            helptext = getattr(param, "help", None)
            assert helptext and helptext.strip(), f"{' '.join(path)}: {param.name} has no help text"
            # shown verbatim (no markup eaten, e.g. the [plot] of pip install 'onnx-excite[plot]')
            if not getattr(param, "hidden", False):   # hidden aliases (e.g. --output for --logits) are not listed
                assert re.sub(r"\s+", "", helptext) in flat, (path, param.name, helptext)
        seen += 1
    assert seen >= 10   # the app, its commands and the eval sub-commands
