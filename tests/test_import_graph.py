"""The package layout's rules, read from the source with `ast`: no import cycles
between files, and imports that go one way down the layers, one folder each

    wallperf/ (CLI, run driver, bench, tools)  ->  audit/  ->  harness/ (LoadGen,
    hardware and config mechanics)  ->  sut/  ->  kernels/

Every top-level folder is one layer, so no folder sits both above and below
another. Modules are named as installed: the folder harness/ is `wallperf.harness`.

Every import counts, the ones inside functions too: a lazy import still ties the
two files together. `python tests/test_import_graph.py` prints the graph's summary.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Highest first: (layer, the folder that holds it, its import name). A module
# may import its own layer or any below it.
LAYERS = (
    ("top", "wallperf", "wallperf"),
    ("audit", "audit", "wallperf.audit"),
    ("mechanics", "harness", "wallperf.harness"),
    ("sut", "sut", "wallperf.sut"),
    ("kernels", "kernels", "wallperf.kernels"),
)


def layer_of(module: str) -> int:
    """0 for the top layer, larger further down; the longest matching name wins."""
    best, rank = -1, None
    for i, (_, _, name) in enumerate(LAYERS):
        if (module == name or module.startswith(name + ".")) and len(name) > best:
            best, rank = len(name), i
    if rank is None:
        raise ValueError(f"module {module} is in no layer")
    return rank


def modules_under(root: Path) -> dict[str, Path]:
    found = {}
    for _, folder, package in LAYERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            name = ".".join((package,) + parts)
            found[name] = path
    return found


def imports_of(path: Path, module: str, known: dict) -> set[str]:
    """The project modules `module` (at `path`) imports, as module names."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module:
                out.add(t)
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    known = modules_under(root)
    return {m: imports_of(p, m, known) for m, p in known.items()}


def upward_imports(graph: dict) -> list[str]:
    bad = []
    for src, dsts in sorted(graph.items()):
        for dst in sorted(dsts):
            if layer_of(dst) < layer_of(src):
                bad.append(f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})")
    return bad


def cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_go_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def _tree(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for _, folder, _ in LAYERS:
        (root / folder).mkdir(exist_ok=True)
    (root / "wallperf" / "__init__.py").touch()
    return root


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    """The layer order broken on purpose: sut reaching up into the harness (even
    lazily, inside a function), and two kernels importing each other."""
    root = _tree(tmp_path, {
        "harness/loadgen/__init__.py": "",
        "harness/loadgen/logs.py": "X = 1\n",
        "sut/engine.py": "def f():\n    from wallperf.harness.loadgen.logs import X\n    return X\n",
        "kernels/a.py": "from wallperf.kernels import b\n",
        "kernels/b.py": "from . import a\n",
        "wallperf/cli.py": "import wallperf.audit.gate\nfrom wallperf.sut import engine\n",
        "audit/gate.py": "from wallperf.harness.loadgen import logs\n",
    })
    graph = import_graph(root)
    assert graph["wallperf.sut.engine"] == {"wallperf.harness.loadgen.logs"}
    assert upward_imports(graph) == ["wallperf.sut.engine (sut) imports wallperf.harness.loadgen.logs (mechanics)"]
    assert cycles(graph) == [["wallperf.kernels.a", "wallperf.kernels.b"]]


if __name__ == "__main__":
    g = import_graph()
    edges = sum(len(v) for v in g.values())
    for i, (name, folder, package) in enumerate(LAYERS):
        members = sorted(m for m in g if layer_of(m) == i)
        print(f"{name:9s} {len(members):3d} modules  ({folder}/ = {package})")
    print(f"{len(g)} modules, {edges} imports between them")
    print(f"cycles: {cycles(g) or 'none'}")
    print("upward imports: " + ("\n  ".join([""] + upward_imports(g)) if upward_imports(g) else "none"))
