"""The packages' module-level import graph has no circle (imports inside functions — the lazy ones that keep
TensorFlow-heavy modules off an import path — are not edges: they run after every module is loaded)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict:
    out = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _top_level_imports(tree):
    """Import statements executed when the module is imported: the module body, and the bodies of its
    top-level ``if`` / ``try`` blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", [])
            for h in getattr(node, "handlers", []):
                stack += h.body


def import_graph(packages=("tf_influence", "tfx_components")) -> dict:
    mods = {}
    for pkg in packages:
        mods.update(_modules(pkg))
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                mod = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def circles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_walk_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["tf_influence.tracin", "tf_influence.kfac"])
def test_moved_name_shims_add_no_edge(module):
    edges = import_graph()
    assert "tf_influence.presence.sequential" not in edges[module]
    assert "tf_influence.ghost_norms" not in edges[module]


def _private_imports(packages=("tf_influence", "tfx_components", "pipelines")):
    """``(module, imported module, name)`` for every ``from X import _name`` (at any depth of the module) where
    ``X`` is in another package than the importing module: a private name is a package's own business."""
    found = []
    for pkg in packages:
        for m, path in _modules(pkg).items():
            own = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = own.split(".")[:len(own.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                target_pkg = target if (ROOT / target.replace(".", "/")).is_dir() else target.rsplit(".", 1)[0]
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target_pkg != own:
                        found.append((m, target, alias.name))
    return found


def test_no_private_name_crosses_a_package():
    assert _private_imports() == []


def test_the_private_import_check_finds_one(tmp_path, monkeypatch):
    """The walk itself: a module of another package importing a private name is reported."""
    (tmp_path / "pa").mkdir()
    (tmp_path / "pa" / "__init__.py").write_text("")
    (tmp_path / "pa" / "sub").mkdir()
    (tmp_path / "pa" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pa" / "a.py").write_text("def _hidden():\n    pass\n")
    (tmp_path / "pa" / "b.py").write_text("from .a import _hidden\n")             # same package: allowed
    (tmp_path / "pa" / "sub" / "c.py").write_text("def f():\n    from ..a import _hidden\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert _private_imports(("pa",)) == [("pa.sub.c", "pa.a", "_hidden")]
