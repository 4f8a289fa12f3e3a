"""The layer rules of docs/architecture.md, read from the code (every import, also inside
functions): a rule broken here is an arrow running the wrong way."""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "RadGSRegLib"


def _module_name(path: Path) -> str:
    rel = path.relative_to(LIB.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(absolute module imported, at module level?, line) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, id(node) in top, node.lineno))
            out += [(f"{mod}.{a.name}", id(node) in top, node.lineno) for a in node.names]
    return out


MODULES = {_module_name(p): p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts and "_resources" not in p.parts}


def _violations(prefixes_from, prefixes_to, *, module_level_only=False):
    bad = []
    for name, path in MODULES.items():
        if not any(name == p or name.startswith(p + ".") for p in prefixes_from):
            continue
        for mod, at_top, line in _imports(path):
            if module_level_only and not at_top:
                continue
            if any(mod == p or mod.startswith(p + ".") for p in prefixes_to):
                bad.append(f"{path.relative_to(LIB.parent)}:{line} imports {mod}")
    return sorted(set(bad))


def test_the_rules_see_the_package():
    assert {"RadGSRegLib.register.pipeline", "RadGSRegLib.learned.infer", "RadGSRegLib.training.train",
            "RadGSRegLib.region", "RadGSRegLib.similarity", "RadGSRegLib.resources"} <= set(MODULES)
    imports = {m for m, _, _ in _imports(MODULES["RadGSRegLib.register.pipeline"])}
    assert "RadGSRegLib.register.search" in imports and "RadGSRegLib.learned.infer" in imports
    # an arrow that exists is seen (training uses the networks), also inside functions
    assert _violations(["RadGSRegLib.training"], ["RadGSRegLib.learned.model"])
    assert _violations(["RadGSRegLib.register.pipeline"], ["RadGSRegLib.learned.infer"])


@pytest.mark.parametrize("source, target", [
    # registration uses the networks, never their training
    (["RadGSRegLib.register", "RadGSRegLib.learned"], ["RadGSRegLib.training"]),
    # the low layers know nothing of registration, networks, training or Slicer
    (["RadGSRegLib.geometry", "RadGSRegLib.io", "RadGSRegLib.volume", "RadGSRegLib.metrics", "RadGSRegLib.region",
      "RadGSRegLib.similarity", "RadGSRegLib.drr", "RadGSRegLib.gaussians", "RadGSRegLib.configio",
      "RadGSRegLib.resources"],
     ["RadGSRegLib.register", "RadGSRegLib.learned", "RadGSRegLib.training", "RadGSRegLib.cli",
      "RadGSRegLib.slicer_bridge", "RadGSRegLib.bench", "RadGSRegLib.evaluate"]),
    # the networks do not reach up into registration, the CLI or the benchmarks
    (["RadGSRegLib.learned", "RadGSRegLib.training"], ["RadGSRegLib.register", "RadGSRegLib.cli", "RadGSRegLib.bench"]),
    # nothing in the library depends on the CLI
    ([n for n in MODULES if n != "RadGSRegLib.cli"], ["RadGSRegLib.cli"]),
])
def test_arrows_point_down(source, target):
    assert _violations(source, target) == []


def test_no_slicer_or_qt_at_module_level():
    assert _violations(["RadGSRegLib"], ["slicer", "qt", "ctk", "RadGSReg"], module_level_only=True) == []


def test_what_slicer_imports_at_load_is_torch_free():
    for name in ("RadGSRegLib.register", "RadGSRegLib.register.config", "RadGSRegLib.levels", "RadGSRegLib.geometry",
                 "RadGSRegLib.resources", "RadGSRegLib.configio"):
        top = [m for m, at_top, _ in _imports(MODULES[name]) if at_top]
        assert not [m for m in top if m.split(".")[0] in ("torch", "roma", "monai", "numba", "scipy")], name


def test_registration_never_reads_the_ground_truth():
    for name, path in MODULES.items():
        if name.startswith("RadGSRegLib.register") or name.startswith("RadGSRegLib.learned"):
            used = [n.lineno for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Attribute) and n.attr == "ground_truth"]
            assert not used, f"{path}: .ground_truth at lines {used}"


def test_resources_are_found_through_one_helper():
    """Only resources.py knows where the Resources folder is."""
    for name, path in MODULES.items():
        if name == "RadGSRegLib.resources":
            continue
        text = path.read_text()
        assert not ('"Resources"' in text and "__file__" in text), f"{path} walks to Resources itself"
