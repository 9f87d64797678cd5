"""The architecture, checked: imports form no cycle, no module reads another's private names,
and a quantized compile serialises the model at most three times."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import onnx
import pytest

import edgec
from edgec.ir import IR

from conftest import EXAMPLE

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"compiler": "edgec", "passes": "edgec.passes", "backends": "edgec.backends"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package] + parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the file, at any level."""
    tree = ast.parse(path.read_text())
    base = name if _is_package(name) else name.rpartition(".")[0]
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only: never imported at run time
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.extend((a.name, None, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                mod = f"{pkg}.{node.module}" if node.module else pkg
            else:
                mod = node.module or ""
            out.extend((mod, a.name, node.lineno) for a in node.names)
    return out


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        for mod, item, _ in _imports(name, path):
            target = f"{mod}.{item}" if item and f"{mod}.{item}" in MODULES else mod
            while target and target not in MODULES:  # import a.b.c -> the edgec module it names
                target = target.rpartition(".")[0]
            if target and target != name:
                g.add_edge(name, target)
    return g


def test_no_import_cycles():
    """Read from the source (every import statement, module- or function-level): the modules'
    import graph is acyclic. compiler/ is the core, passes/ and backends/ build on it, and the
    entry points (api, cli) sit on top."""
    cycles = [c for c in nx.simple_cycles(_graph())]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in sorted(cycles, key=len)[:10])


def test_no_module_reads_another_modules_private_names():
    found = []
    for name, path in MODULES.items():
        for mod, item, line in _imports(name, path):
            if mod.startswith("edgec") and item and item.startswith("_") and not item.startswith("__"):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {item} from {mod}")
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    aliases[a.asname or a.name] = node.module or ""
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("edgec"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = aliases[node.value.id]
                resolved = f"{target}.{node.value.id}" if f"{target}.{node.value.id}" in MODULES else target
                if resolved in MODULES or resolved.startswith(("edgec", ".")) or resolved == "":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("quantize", ["int8", "mixed"])
def test_a_quantized_compile_serialises_the_model_at_most_three_times(monkeypatch, quantize):
    """Load (ONNX -> IR), one measuring copy (IR -> ONNX, from which calibration and the probe that
    measures every plan are built), save (IR -> ONNX). IR.copy() is not a serialisation: it
    copies the graph (tests/test_ir.py)."""
    calls = []
    to_onnx, from_onnx = IR.to_onnx, IR.from_onnx.__func__

    def counted_to(self, **kw):
        calls.append("export")
        return to_onnx(self, **kw)

    def counted_from(cls, model, info=None):
        calls.append("import")
        return from_onnx(cls, model, info)

    monkeypatch.setattr(IR, "to_onnx", counted_to)
    monkeypatch.setattr(IR, "from_onnx", classmethod(counted_from))
    result = edgec.compile(EXAMPLE / "model.onnx", quantize=quantize, calib=EXAMPLE / "calib.npz", verify=True,
                           max_error=0.05 if quantize == "mixed" else None)
    assert isinstance(result.model, onnx.ModelProto)
    assert len(calls) <= 3, calls
    assert calls.count("import") == 1, calls
