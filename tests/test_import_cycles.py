"""The package's modules import each other without a circle: the graph of the imports each
module runs when it is loaded (its top-level ``import`` / ``from ... import`` statements, also
inside a top-level ``if`` / ``try``; imports inside functions run later and are left out) has no
cycle through the library, and every module imports in a fresh interpreter.

An import of a module's own enclosing package (``from . import scoring``) is no edge to that
package: it is being loaded already when its submodule is. The CLI registers its commands
by importing the command modules at the end of ``cli/app.py``, each of which adds its commands
to app's typer app: a circle inside ``onnx_excite.cli`` only, which the check leaves to the CLI."""
import ast
import subprocess
import sys
from pathlib import Path

import onnx_excite

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> list[tuple[Path, str]]:
    """(folder, dotted name) of the package and of cli/ and models/ (onnx_excite.cli /
    onnx_excite.models: inside the package in a wheel, beside it in a checkout)."""
    import onnx_excite.cli
    import onnx_excite.models

    folders = [(Path(onnx_excite.__file__).parent, "onnx_excite")]
    for sub in (onnx_excite.cli, onnx_excite.models):
        folder = Path(sub.__file__).parent
        if not folder.is_relative_to(folders[0][0]):
            folders.append((folder, sub.__name__))
    return folders


def modules() -> dict[str, Path]:
    """Every module: dotted name -> file (a package is its ``__init__.py``)."""
    found = {}
    for folder, name in _packages():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def _top_level(body):
    """The import statements a module runs when it is loaded."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])


def _everywhere(body):
    """Every import statement, also those inside functions (run when the function is)."""
    for node in body:
        yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> the package modules its loading imports (``lazy``: or any of its functions)."""
    mods = modules()
    statements = _everywhere if lazy else _top_level
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in statements(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            edges.update(t for t in targets if t in mods and t != name and not name.startswith(t + "."))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert len(graph) > 80 and "onnx_excite.targets.export" in graph and "onnx_excite.models.resolve" in graph
    assert graph["onnx_excite.run.runtime"] >= {"onnx_excite.run.devices", "onnx_excite.run.ort", "onnx_excite.io.modelfile"}
    assert [c for c in cycles(graph) if not all(m.startswith("onnx_excite.cli.") for m in c)] == []


def test_no_circle_through_the_builder_sessions_devices_targets_even_lazily():
    """The model files, ORT's import and session options, the builder, the runtime, the
    devices, the targets and the model resolver depend on each other one way only, also
    through the imports inside functions."""
    layered = ("onnx_excite.io.modelfile", "onnx_excite.run.", "onnx_excite.graph.builder", "onnx_excite.graph.options",
               "onnx_excite.targets", "onnx_excite.models", "onnx_excite.apps.bench")
    for cycle in cycles(import_graph(lazy=True)):
        assert not [m for m in cycle if m.startswith(layered)], cycle


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in modules() if not n.endswith("__main__"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
