"""No import cycle between urae_lite's modules, counting imports inside functions (a lazy import still ties two
modules together: each needs the other to work)."""

from __future__ import annotations

import ast
from pathlib import Path

import urae_lite

REPO = Path(__file__).resolve().parents[1]


def module_names(package: Path, name: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package's `__init__` under its own name)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = [name, *path.relative_to(package).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base) if node.level else node.module
                for alias in node.names:  # `from . import x` imports the module x when there is one
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_local_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("def g():\n    from . import a\n")
    (pkg / "d.py").write_text("from .a import x\n")
    graph = import_graph(module_names(pkg, "pkg"))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_urae_lite_has_no_import_cycle():
    modules = module_names(Path(urae_lite.__file__).parent, "urae_lite")
    modules |= module_names(REPO / "kernels", "urae_lite.kernels")  # installed as urae_lite.kernels
    graph = import_graph(modules)
    assert {"urae_lite.model_files", "urae_lite.single_file"} <= graph["urae_lite.loader"] | graph[
        "urae_lite.model_files"
    ]
    assert cycles(graph) == []


# The layers: the command modules (the `urae-lite` subcommands) may ask the planner; the library that generates and
# trains never does, and the fake-tensor harness (urae_lite.measure) is for tests and benchmarks only.
COMMANDS = {"urae_lite.cli", "urae_lite.generate", "urae_lite.train_cli", "urae_lite.doctor"}


def _urae_graph() -> dict[str, set[str]]:
    modules = module_names(Path(urae_lite.__file__).parent, "urae_lite")
    modules |= module_names(REPO / "kernels", "urae_lite.kernels")
    return import_graph(modules)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_runtime_module_imports_the_planner_or_the_harness():
    graph = _urae_graph()
    planner = {m for m in graph if _in(m, "urae_lite.plan")}
    harness = {m for m in graph if _in(m, "urae_lite.measure")}
    runtime = set(graph) - planner - harness - COMMANDS
    assert runtime, "no runtime modules found"
    offenders = {m: sorted(graph[m] & (planner | harness)) for m in runtime if graph[m] & (planner | harness)}
    assert offenders == {}
    assert not any(graph[m] & harness for m in planner), "the planner estimates; measuring is the harness's"


def test_the_training_package_does_not_import_the_planner():
    graph = _urae_graph()
    train = [m for m in graph if _in(m, "urae_lite.train")]
    assert train and not [m for m in train if any(_in(t, "urae_lite.plan") for t in graph[m])]


def test_the_command_line_parser_loads_no_heavy_library():
    """Building `urae-lite`'s parser imports every command module: none may load diffusers (which loads Triton),
    Gradio, matplotlib or our kernels at import time. Besides start-up time, `doctor` must choose Triton's
    interpreter before Triton is first imported (a command module that loaded diffusers broke it once)."""
    import subprocess
    import sys

    heavy = ("diffusers", "triton", "transformers", "bitsandbytes", "gradio", "matplotlib", "tensorboard",
             "urae_lite.kernels")  # fmt: skip
    code = (
        "import sys; from urae_lite.cli import build_parser; build_parser(); "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""
