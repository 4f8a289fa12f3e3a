"""The code that runs inside 3D Slicer must run on the Python of every Slicer release the
README claims: Slicer 5.8 bundles Python 3.9.10, Slicer 5.10 and 5.12 bundle 3.12.10
(``Slicer_REQUIRED_PYTHON_VERSION`` in Slicer's CMakeLists.txt at v5.8.0, v5.10.0,
v5.12.3). We cannot run Slicer's interpreter here, so:

- ``vermin`` (PyPI) finds language and library features newer than 3.9;
- our own check finds ``X | Y`` types where Python evaluates them at run time (vermin's
  union-type detection ignores ``from __future__ import annotations``);
- where a Python 3.9 interpreter exists on the machine, every file compiles under it and
  the modules Slicer imports before torch is installed import and work under it.
"""
import ast
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICER_CODE = [ROOT / "RadGSRegLib", ROOT / "RadGSReg"]
OLDEST = "3.9"


def _files():
    for base in SLICER_CODE:
        yield from sorted(base.rglob("*.py"))


def test_vermin_finds_nothing_newer_than_python_3_9():
    pytest.importorskip("vermin")
    exe = Path(sys.executable).with_name("vermin")           # the console script beside this interpreter
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys, vermin.main; sys.exit(vermin.main.main())"]
    run = subprocess.run([*cmd, "--no-tips", f"-t={OLDEST}-", "--violations",
                          "--eval-annotations", *map(str, SLICER_CODE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _is_union(node) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)


def runtime_union_types(source: str) -> list:
    """Line numbers where ``X | Y`` of types would be evaluated at run time on Python < 3.10:
    annotations in a file without ``from __future__ import annotations``, and the type
    arguments of isinstance / issubclass."""
    tree = ast.parse(source)
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    lines = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations += [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs if a.annotation]
            annotations += [a.annotation for a in (args.vararg, args.kwarg) if a is not None and a.annotation]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        if not future:
            lines += [a.lineno for a in annotations if any(_is_union(n) for n in ast.walk(a))]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("isinstance", "issubclass") and len(node.args) == 2 and _is_union(node.args[1]):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_no_union_types_evaluated_at_run_time():
    found = {str(f.relative_to(ROOT)): runtime_union_types(f.read_text(encoding="utf-8")) for f in _files()}
    assert not {k: v for k, v in found.items() if v}


def test_the_union_check_finds_what_python_3_9_refuses():
    assert runtime_union_types("def f(x: int | None): pass\n") == [1]
    assert runtime_union_types("y: int | None = None\n") == [1]
    assert runtime_union_types("isinstance(1, int | float)\n") == [1]
    assert runtime_union_types("from __future__ import annotations\ndef f(x: int | None): pass\n") == []
    assert runtime_union_types("from __future__ import annotations\nisinstance(1, int | float)\n") == [2]
    assert runtime_union_types("flags = 1 | 2\n") == []


def _python39():
    """A working Python 3.9 interpreter, or None (pyenv shims that refuse to run are skipped)."""
    candidates = [shutil.which(f"python{OLDEST}")]
    for pattern in (f"~/.pyenv/versions/{OLDEST}*/bin/python{OLDEST}", f"/usr/local/bin/python{OLDEST}",
                    f"/usr/bin/python{OLDEST}"):
        candidates += sorted(glob.glob(os.path.expanduser(pattern)))
    for py in filter(None, candidates):
        try:
            out = subprocess.run([py, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out == f"({OLDEST.replace('.', ', ')})":
            return py
    return None


_SMOKE = """
import dataclasses, json, typing
from RadGSRegLib.register.config import RegisterConfig, config_to_dict, Level, RefineConfig, SearchConfig
from RadGSRegLib.levels import resolve_level, level_of_segment_name
from RadGSRegLib.resources import find_resource
from RadGSRegLib.sample_data import recorded_checksums
assert find_resource("Models/radgsreg_stage1.pt") is not None and "example_ct.nii.gz" in recorded_checksums()
from RadGSRegLib.progress import ProgressEvent, Reporter, parse_line, to_json_line
from RadGSRegLib import job, slicer_requirements
cfg = RegisterConfig.from_dict(json.loads(json.dumps(config_to_dict(RegisterConfig(min_ncc=0.8)))))
assert cfg.min_ncc == 0.8 and cfg.refine2d.levels[0].highpass_mm is None
for cls in (RegisterConfig, SearchConfig, RefineConfig, Level):
    typing.get_type_hints(cls)
assert level_of_segment_name("vertebrae_L3") == "L3"
events = []
Reporter(events.append).stage("search", "x", within=(1, 3))
assert parse_line(to_json_line(events[0])) == events[0]
assert job.register_command(["python"], "c", "r", "k.json", 2)[-2:] == ["--threads", "2"]
slicer_requirements.constraints()
print("ok")
"""


def test_compiles_and_imports_under_python_3_9(tmp_path):
    py = _python39()
    if py is None:
        pytest.skip(f"no Python {OLDEST} interpreter on this machine (vermin and the union check still ran)")
    files = [str(f) for f in _files()]
    run = subprocess.run([py, "-c", "import os, py_compile, sys\n"
                          "for i, f in enumerate(sys.argv[2:]):\n"
                          "    py_compile.compile(f, cfile=os.path.join(sys.argv[1], f'{i}.pyc'), doraise=True)",
                          str(tmp_path), *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([py, "-B", "-c", _SMOKE], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
