"""The package's shape, held as tests: stages import downwards only, no cycles, no
private names across modules, torch only in ``shardstream.pytorch``, small modules.

See docs/ARCHITECTURE.md for the stage map these rules keep true.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "shardstream"

#: stage -> rank; a module may import its own stage or a lower rank
STAGES = {"errors": 0, "format": 1, "storage": 2, "read": 3, "write": 3, "pytorch": 4,
          "integrations": 4, "cli": 5}
#: the one module of ``write`` that reads a dataset (convert re-encodes one)
READS_TO_WRITE = {"shardstream.write.convert"}
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str, module: str, level: int, is_pkg: bool) -> str:
    if level == 0:
        return name
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import, lazy ones too."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", module, node.level, is_pkg)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((base, a.name, node.lineno))
    return out


def _internal(module: str) -> list[tuple[str, str | None, int]]:
    return [(m, n, ln) for m, n, ln in _imports(module)
            if m in MODULES and m != "shardstream"]


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _, _ in _internal(m) if t != m} for m in MODULES}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not (m.startswith(t + ".") and
                                                MODULES[t].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_stages_import_downwards() -> None:
    bad = []
    for m in MODULES:
        src = _stage(m)
        if src not in STAGES:
            continue
        for t, _, line in _internal(m):
            dst = _stage(t)
            if dst not in STAGES or dst == src:
                continue
            if STAGES[dst] > STAGES[src] or (
                    STAGES[dst] == STAGES[src] and not (m in READS_TO_WRITE and dst == "read")):
                bad.append(f"{m}:{line} imports {t} ({src} -> {dst})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules() -> None:
    bad = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for t, name, line in _internal(m):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{m}:{line} imports {t}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", m, node.level, path.name == "__init__.py")
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_torch_only_in_the_pytorch_layer() -> None:
    bad = [f"{m}:{line} imports {t}" for m in MODULES for t, _, line in _imports(m)
           if (t == "torch" or t.startswith("torch.")) and _stage(m) != "pytorch"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_class_sizes(module: str) -> None:
    text = MODULES[module].read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines (max {MAX_MODULE_LINES})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, \
                f"{module}.{node.name}: {size} lines (max {MAX_CLASS_LINES})"


def test_import_shardstream_needs_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, shardstream, shardstream.cli, shardstream.read.verify, "
            "shardstream.write.parallel; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_architecture_lists_every_module() -> None:
    """docs/ARCHITECTURE.md is where a newcomer finds a stage: it names every module."""
    doc = (PKG.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(PKG)) for p in MODULES.values()
               if p.name != "__init__.py" and f"{p.relative_to(PKG)}" not in doc
               and p.parent != PKG]
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {missing}"
