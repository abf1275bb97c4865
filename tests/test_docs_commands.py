"""The README and docs/ stay true to the CLI: every `onnx-excite` command in their code blocks
parses (options, arguments, values), every command quoted inline names real commands and
options, the paths the commands name are in the repository, the README's quick start runs as
written, and its command table lists every command of `onnx-excite --help`."""
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import ROOT
from onnx_excite.cli.app import app

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
ROOT_COMMAND = typer.main.get_command(app)
#: top-level folders a fresh clone has, linked into a work folder so commands run as written
TREES = ("onnx_excite", "tests", "docs", "benchmarks", "scripts", "cli", "models")
NOT_RUN = "<!-- not run:"


def fenced_blocks(text: str, langs=("bash", "sh", "")):
    """(language, body, runnable) of every fenced block whose language is in ``langs``;
    a block right after a ``<!-- not run: ... -->`` line is not runnable."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in langs:
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1]
            yield m.group(1), m.group(2), not before.startswith(NOT_RUN)


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def shell_commands(block: str):
    """The commands of a shell block: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and pipes."""
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        command = []
        for token in tokens + [";"]:
            if token in ("&&", "||", ";", "|"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)


def doc_commands():
    """(file, args after `onnx-excite`) of every onnx-excite command in a code block."""
    for path in DOCS:
        for _, block, _ in fenced_blocks(path.read_text(encoding="utf-8")):
            for command in shell_commands(block):
                if command[0] == "onnx-excite":
                    yield path.relative_to(ROOT).as_posix(), command[1:]


def is_group(command) -> bool:
    return hasattr(command, "resolve_command")   # duck-typed: typer may bring its own click


def parse(args):
    """Parse ``args`` as the CLI would, down to the leaf command, without running it (a
    usage error raises)."""
    def left(ctx):
        protected = getattr(ctx, "_protected_args", None)
        return list(ctx.protected_args if protected is None else protected) + list(ctx.args)

    ctx = ROOT_COMMAND.make_context("onnx-excite", list(args))
    command, rest = ROOT_COMMAND, left(ctx)
    while is_group(command):
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        rest = left(ctx)
    assert not rest, f"unexpected extra arguments {rest}"
    return command


def resolve(words):
    """The command named by the leading words of ``words`` and the words left."""
    command, words = ROOT_COMMAND, list(words)
    while is_group(command) and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    return command, words


def test_every_command_in_a_code_block_parses():
    commands = list(doc_commands())
    assert len(commands) >= 45, len(commands)
    failures = []
    for where, args in commands:
        try:
            parse(args)
        except Exception as exc:   # noqa: BLE001 (usage errors of whichever click typer uses)
            failures.append(f"{where}: onnx-excite {shlex.join(args)}: {exc}")
    assert not failures, "\n".join(failures)


def test_every_inline_command_names_real_commands_and_options():
    spans = [(p.relative_to(ROOT).as_posix(), m.group(1)) for p in DOCS
             for m in re.finditer(r"`(onnx-excite(?: [^`]*)?)`", p.read_text(encoding="utf-8"))]
    assert len(spans) >= 40, len(spans)
    failures = []
    for where, span in spans:
        words = span.replace("\\|", "|").split()[1:]
        command, rest = resolve(words)
        if is_group(command) and rest and not rest[0].startswith("-") and rest[0].islower() \
                and "|" not in rest[0]:
            failures.append(f"{where}: `{span}`: no command {rest[0]!r}")
            continue
        if is_group(command):   # `eval pointing|localization`: every alternative is a command
            alternatives = rest[0].split("|") if rest and "|" in rest[0] else []
            failures += [f"{where}: `{span}`: no command {a!r}" for a in alternatives if a not in command.commands]
            continue
        names = {opt for param in command.params for opt in param.opts + param.secondary_opts} | {"--help"}
        for word in rest:
            option = re.match(r"\[?(--?[a-z][a-z0-9-]*)", word)
            if option and option.group(1) not in names:
                failures.append(f"{where}: `{span}`: {command.name} has no option {option.group(1)}")
    assert not failures, "\n".join(failures)


def test_the_command_table_lists_every_command():
    table = section((ROOT / "README.md").read_text(encoding="utf-8"), "Commands")
    rows = re.findall(r"^\| `onnx-excite ([a-z-]+)", table, re.M)
    assert sorted(rows) == sorted(ROOT_COMMAND.commands), rows
    assert len(rows) == len(set(rows)), "one row per command"


def test_paths_the_commands_name_exist():
    missing = []
    for path in DOCS:
        for _, block, _ in fenced_blocks(path.read_text(encoding="utf-8")):
            for command in shell_commands(block):
                for token in command:
                    for word in re.split(r"[=,]", token):
                        if re.match(r"(onnx_excite|tests|benchmarks|scripts|docs)/", word) and not list(ROOT.glob(word)):
                            missing.append(f"{path.name}: {word}")
                if command[:2] == ["python", "-m"] and command[2] != "pytest":
                    import importlib.util
                    if importlib.util.find_spec(command[2]) is None:
                        missing.append(f"{path.name}: module {command[2]}")
    assert not missing, missing


def test_docs_need_no_sibling_data_and_link_what_exists():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{path.name} reads data outside the repository"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (path.parent / link).exists(), f"{path.name}: broken link {link}"
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 20_000
    (image,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme.decode())
    assert (ROOT / image).stat().st_size <= 150_000


def work_folder(tmp_path: Path) -> Path:
    """A folder laid out as a fresh clone (links to the repository's trees), with an
    `onnx-excite` command on PATH that runs this checkout's CLI."""
    work = tmp_path / "clone"
    work.mkdir()
    for tree in TREES:
        (work / tree).symlink_to(ROOT / tree, target_is_directory=True)
    shim = tmp_path / "bin" / "onnx-excite"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                    "\"import sys; from onnx_excite.cli.app import main; sys.argv[0] = 'onnx-excite'; main()\" \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return work


def test_the_quick_start_runs_as_written(tmp_path):
    from onnx_excite.models.mobilenet_v2 import load_default_model

    load_default_model()   # command 1 of the README built and cached it
    work = work_folder(tmp_path)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    blocks = [b for _, b, run in fenced_blocks(section((ROOT / "README.md").read_text(encoding="utf-8"), "Quick start"))
              if run]
    assert len(blocks) == 2
    for block in blocks:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{block}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    records = (work / "excite_out" / "explanations.jsonl").read_text().splitlines()
    assert len(records) == 4   # dog, kite; horses (top 3 in one record); dog with two targets
    assert sorted(p.name for p in (work / "my_out").glob("*.cmwp.features.13.png"))[:1]
    assert len(list((work / "my_out").glob("*.png"))) >= 8   # four photos, MWP and c-MWP each


@pytest.mark.parametrize("args", [["explain", "default", "x.jpg", "--no-such-option"], ["no-such-command"],
                                  ["explain", "default", "x.jpg", "--top", "many"], ["eval", "pointing", "-o", "out"]])
def test_the_parser_rejects_what_the_cli_rejects(args):
    with pytest.raises(Exception, match="(?i)no such|invalid|valid|missing"):
        parse(args)
