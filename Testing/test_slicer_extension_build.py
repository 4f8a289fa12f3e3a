"""The Slicer extension's CMake project, configured against a stand-in Slicer package.

``Testing/slicer_cmake_stub`` is a small "Slicer" package written for these tests: its
``slicerMacroBuildScriptedModule`` applies the file rules of Slicer's macro of that name
(Slicer v5.8.0, ``CMake/SlicerMacroBuildScriptedModule.cmake``: every SCRIPTS/RESOURCES entry
must exist under the module folder, or be a GENERATED file of its build folder) and places the
files where CTK's ``ctkMacroCompilePythonScript`` (``CMake/ctkMacroCompilePythonScript.cmake``,
CTK commit 82cae57 that Slicer v5.8.0 builds, same rules on CTK main) puts them; its
``SlicerExtensionCPack.cmake`` checks, as Slicer's does, that ``EXTENSION_README_FILE`` and
``EXTENSION_LICENSE_FILE`` exist. The rules are described in those files' header comments.

The tests configure the real extension with ``cmake`` and then check the scripted-modules
folder of the build tree (and of an install): ``RadGSReg.py``, the whole ``RadGSRegLib``
package and ``Resources`` side by side, importable from there. They also check the extension's
catalog entry ``RadGSReg.json`` (Slicer's ``Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json``)
against ``RadGSReg.s4ext`` and the top-level ``CMakeLists.txt``.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "Testing" / "slicer_cmake_stub"
#: Slicer_QTSCRIPTEDMODULES_LIB_DIR of the stand-in package
SCRIPTED_MODULES_DIR = "lib/Slicer-5.8/qt-scripted-modules"
#: the catalog-entry schema the extension's JSON follows
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.1.json#")
#: files that only ever appear as local caches and are never shipped
_CACHE = re.compile(r"(^|/)__pycache__/|\.pyc$|(^|/)\.[^/]*$")


def _cmake() -> str | None:
    """The cmake binary: the one installed with this Python (PyPI ``cmake``), else on PATH."""
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which("cmake", path=path)


def _generator_args() -> list[str]:
    if shutil.which("ninja"):
        return ["-G", "Ninja"]
    if shutil.which("make"):
        return ["-G", "Unix Makefiles"]
    return []


def _configure(source: Path, build: Path, *extra: str) -> subprocess.CompletedProcess:
    cmake = _cmake()
    if cmake is None:
        pytest.skip("no cmake binary (pip install cmake, or the system's cmake)")
    return subprocess.run(
        [cmake, "-S", str(source), "-B", str(build), *_generator_args(), f"-DSlicer_DIR={STUB}", *extra],
        capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> set[str]:
    """Relative POSIX paths of the files under ``folder``, without caches."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not _CACHE.search(p.relative_to(folder).as_posix())}


def _one_line(text: str) -> str:
    """CMake wraps and indents long messages: compare with whitespace collapsed."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The extension configured with BUILD_TESTING on; (build folder, cmake result)."""
    build = tmp_path_factory.mktemp("RadGSReg-build")
    res = _configure(ROOT, build, "-DBUILD_TESTING:BOOL=ON")
    assert res.returncode == 0, f"configuring the extension failed:\n{res.stdout}\n{res.stderr}"
    return build


@pytest.fixture(scope="module")
def dest(build) -> Path:
    d = build / SCRIPTED_MODULES_DIR
    assert d.is_dir(), d
    return d


# ---------------------------------------------------------------- the scripted-modules folder
def _expected_resources() -> set[str]:
    """What the Python side opens from ``Resources`` (RadGSReg.py, sample_data, pipeline)."""
    sample = ROOT / "Resources" / "SampleData"
    listed = [line.split()[1] for line in (sample / "SHA256SUMS").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert {"example_ct.nii.gz", "totalseg.nii.gz"} <= set(listed)
    configs = sorted(p.name for p in (ROOT / "Resources" / "Models" / "configs").glob("*.json"))
    assert configs, "no training configs in Resources/Models/configs"
    return ({"Icons/RadGSReg.png", "UI/RadGSReg.ui",
             "Models/radgsreg_stage1.pt", "Models/radgsreg_stage1.md", "Models/metal_seg.pt", "Models/metal_seg.md"}
            | {f"SampleData/{n}" for n in [*listed, "LICENSE", "NOTICE", "SHA256SUMS"]}
            | {f"Models/configs/{n}" for n in configs})


def test_module_and_package_land_in_the_scripted_modules_folder(dest):
    assert filecmp.cmp(dest / "RadGSReg.py", ROOT / "RadGSReg" / "RadGSReg.py", shallow=False)
    src = {p for p in _files(ROOT / "RadGSRegLib") if p.endswith(".py")}
    got = {p for p in _files(dest / "RadGSRegLib")}
    assert got == src, f"missing: {sorted(src - got)}, unexpected: {sorted(got - src)}"
    for rel in src:
        assert filecmp.cmp(dest / "RadGSRegLib" / rel, ROOT / "RadGSRegLib" / rel, shallow=False), rel


def test_resources_land_beside_the_module(dest):
    got = _files(dest / "Resources")
    expected = _expected_resources()
    assert expected <= got, f"missing in the build tree: {sorted(expected - got)}"
    # every shipped resource, copied unchanged, and nothing more: a new Resources subfolder
    # must be added to RadGSReg/CMakeLists.txt (RADGSREG_RESOURCE_SUBDIRS)
    src = _files(ROOT / "Resources")
    assert got == src, f"missing: {sorted(src - got)}, unexpected: {sorted(got - src)}"
    for rel in src:
        assert filecmp.cmp(dest / "Resources" / rel, ROOT / "Resources" / rel, shallow=False), rel


def test_nothing_else_in_the_scripted_modules_folder(dest):
    top = {p.name for p in dest.iterdir() if p.name != "__pycache__"}
    assert top == {"RadGSReg.py", "RadGSRegLib", "Resources"}, top


def test_install_holds_the_same_tree(build, dest, tmp_path):
    res = subprocess.run([_cmake(), "--install", str(build), "--prefix", str(tmp_path / "inst")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    installed = tmp_path / "inst" / SCRIPTED_MODULES_DIR
    assert _files(installed) == _files(dest)


def test_package_runs_from_the_scripted_modules_folder(dest, tmp_path):
    """Only the scripted-modules folder provides RadGSRegLib (no source checkout, no editable
    install): the sample CT and the shipped weights are found next to it."""
    code = textwrap.dedent("""
        import hashlib, json, sys
        from pathlib import Path
        dest = Path(sys.argv[1]).resolve()
        # no other folder holding RadGSRegLib (source checkout), no editable-install finder
        sys.path[:] = [p for p in sys.path
                       if Path(p or ".").resolve() == dest or not (Path(p or ".") / "RadGSRegLib").exists()]
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
        import RadGSRegLib.sample_data as sd
        from RadGSRegLib.register.config import default_model
        s = sd.lumbar_ct()
        mods = [m.__file__ for n, m in sys.modules.items()
                if n.split(".")[0] == "RadGSRegLib" and getattr(m, "__file__", None)]
        print(json.dumps({"modules": mods, "ct": str(s.ct), "seg": str(s.seg), "license": str(s.license),
                          "notice": str(s.notice), "model": str(default_model()),
                          "checksums": {n: hashlib.sha256((s.ct.parent / n).read_bytes()).hexdigest() == d
                                        for n, d in sd.recorded_checksums().items()}}))
        """)
    env = {k: v for k, v in os.environ.items() if k not in ("RADGSREG_SAMPLE_DATA", "PYTHONHOME")}
    env.update(PYTHONPATH=str(dest), PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    d = dest.resolve()
    assert out["modules"] and all(Path(m).resolve().is_relative_to(d) for m in out["modules"]), out["modules"]
    sample = d / "Resources" / "SampleData"
    assert Path(out["ct"]) == sample / "example_ct.nii.gz" and Path(out["ct"]).is_file()
    assert Path(out["seg"]) == sample / "totalseg.nii.gz" and Path(out["seg"]).is_file()
    assert Path(out["license"]).is_file() and Path(out["notice"]).is_file()
    assert out["checksums"] and all(out["checksums"].values()), out["checksums"]
    assert Path(out["model"]) == d / "Resources" / "Models" / "radgsreg_stage1.pt"


def test_unittest_registered(build):
    ctest_file = (build / "RadGSReg" / "CTestTestfile.cmake").read_text(encoding="utf-8")
    assert "py_RadGSReg" in ctest_file


def test_packaging_metadata(build):
    meta = dict(line.split("=", 1) for line in (build / "extension_metadata.txt").read_text(encoding="utf-8").splitlines()
                if "=" in line)
    assert Path(meta["EXTENSION_README_FILE"]) == ROOT / "README.md"
    assert Path(meta["EXTENSION_LICENSE_FILE"]) == ROOT / "LICENSE"
    assert meta["EXTENSION_NAME"] == "RadGSReg"
    assert meta["EXTENSION_CATEGORY"] == "Registration"
    assert meta["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    # no public URL yet
    assert meta["EXTENSION_HOMEPAGE"] == "" and meta["EXTENSION_ICONURL"] == ""


# ---------------------------------------------------------------- the stand-in's rules bite
_MODULE_CMAKE = """
cmake_minimum_required(VERSION 3.16.3...3.19.7 FATAL_ERROR)
project(Throwaway NONE)
find_package(Slicer REQUIRED)
include(${Slicer_USE_FILE})
add_subdirectory(Mod)
"""


@pytest.mark.parametrize("case", ["missing", "copied_to_build_folder", "generated_in_build_folder",
                                  "in_module_folder", "absolute"])
def test_stub_applies_the_resource_rules(tmp_path, case):
    """A RESOURCES entry: accepted only as a file under the module folder (copied to the same
    relative path) -- the way the old RadGSReg/CMakeLists.txt listed Resources/... fails."""
    src = tmp_path / "src"
    (src / "Mod").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(_MODULE_CMAKE)
    (src / "Mod" / "Mod.py").write_text("# module\n")
    (src / "Top" / "Icons").mkdir(parents=True)
    (src / "Top" / "Icons" / "Mod.png").write_bytes(b"png")
    entry = "Resources/Icons/Mod.png"
    prepare = ""
    if case == "copied_to_build_folder":  # exists in the build folder, not GENERATED
        prepare = f"configure_file(${{CMAKE_CURRENT_SOURCE_DIR}}/../Top/Icons/Mod.png ${{CMAKE_CURRENT_BINARY_DIR}}/{entry} COPYONLY)"
    elif case == "generated_in_build_folder":  # passes Slicer's check; CTK copies from Mod/
        prepare = (f"configure_file(${{CMAKE_CURRENT_SOURCE_DIR}}/../Top/Icons/Mod.png ${{CMAKE_CURRENT_BINARY_DIR}}/{entry} COPYONLY)\n"
                   f"set_source_files_properties(${{CMAKE_CURRENT_BINARY_DIR}}/{entry} PROPERTIES GENERATED TRUE)")
    elif case == "in_module_folder":
        (src / "Mod" / "Resources" / "Icons").mkdir(parents=True)
        (src / "Mod" / "Resources" / "Icons" / "Mod.png").write_bytes(b"png")
    elif case == "absolute":
        entry = (src / "Top" / "Icons" / "Mod.png").as_posix()
    (src / "Mod" / "CMakeLists.txt").write_text(
        f"{prepare}\nslicerMacroBuildScriptedModule(NAME Mod SCRIPTS Mod.py RESOURCES {entry})\n")
    res = _configure(src, tmp_path / "build")
    log = _one_line(res.stdout + res.stderr)
    dest = tmp_path / "build" / SCRIPTED_MODULES_DIR
    if case in ("missing", "copied_to_build_folder"):
        assert res.returncode != 0
        assert f"slicerMacroBuildScriptedModule(RESOURCES) given nonexistent file or directory '{entry}'" in log
    elif case == "generated_in_build_folder":
        assert res.returncode != 0
        assert "does not exist and nothing makes it" in log and str(src / "Mod" / entry) in log
    elif case == "in_module_folder":
        assert res.returncode == 0, log
        assert _files(dest) == {"Mod.py", entry}
    else:  # accepted, but copied to <destination>/<absolute path>: not next to the module
        assert res.returncode == 0, log
        assert _files(dest) == {"Mod.py", entry.lstrip("/")}


def test_stub_places_absolute_scripts_relative_to_the_build_folder(tmp_path):
    src = tmp_path / "src"
    (src / "Mod").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(_MODULE_CMAKE)
    (src / "Mod" / "Mod.py").write_text("# module\n")
    (src / "Lib").mkdir()
    (src / "Lib" / "x.py").write_text("# lib\n")
    (src / "Mod" / "CMakeLists.txt").write_text(textwrap.dedent("""
        configure_file(${CMAKE_CURRENT_SOURCE_DIR}/../Lib/x.py ${CMAKE_CURRENT_BINARY_DIR}/Lib/x.py COPYONLY)
        slicerMacroBuildScriptedModule(NAME Mod SCRIPTS Mod ${CMAKE_CURRENT_BINARY_DIR}/Lib/x.py)
        slicer_add_python_unittest(SCRIPT Mod.py)
        """))
    res = _configure(src, tmp_path / "build")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _files(tmp_path / "build" / SCRIPTED_MODULES_DIR) == {"Mod.py", "Lib/x.py"}


def test_stub_cpack_requires_readme_and_licence(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(textwrap.dedent("""
        cmake_minimum_required(VERSION 3.16.3...3.19.7 FATAL_ERROR)
        project(Throwaway NONE)
        set(EXTENSION_LICENSE_FILE ${CMAKE_CURRENT_SOURCE_DIR}/LICENSE)
        find_package(Slicer REQUIRED)
        include(${Slicer_USE_FILE})
        include(${Slicer_EXTENSION_CPACK})
        """))
    res = _configure(src, tmp_path / "build")
    assert res.returncode != 0
    assert "EXTENSION_LICENSE_FILE points to an inexistent file" in _one_line(res.stdout + res.stderr)


# ---------------------------------------------------------------- metadata files
def _s4ext() -> dict[str, str]:
    """RadGSReg.s4ext as Slicer reads it: keyword, then the rest of the line; the last wins."""
    out = {}
    for line in (ROOT / "RadGSReg.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out[key] = value.strip()
    return out


def _cmake_extension_vars() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))


# Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (Slicer v5.8.0), in short:
# an object with no properties beyond these, each of the given JSON type; the first three are
# required; scm_type is "git" or "local"; build_dependencies is a list of strings; tier 1..5.
_SCHEMA_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                 "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
_SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}


def test_catalog_entry_follows_the_schema():
    entry = json.loads((ROOT / "RadGSReg.json").read_text(encoding="utf-8"))
    assert isinstance(entry, dict)
    assert set(entry) <= set(_SCHEMA_TYPES), set(entry) - set(_SCHEMA_TYPES)
    assert _SCHEMA_REQUIRED <= set(entry)
    for key, value in entry.items():
        assert isinstance(value, _SCHEMA_TYPES[key]) and not (key == "tier" and isinstance(value, bool)), key
    assert entry["$schema"] == SCHEMA_URL
    assert entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    if "tier" in entry:
        assert 1 <= entry["tier"] <= 5
    # Slicer 5.8's reader of catalog entries (Extensions/CMake/SlicerFunctionExtractExtensionDescription.cmake)
    # also requires scm_revision to be present
    assert "scm_revision" in entry


def test_catalog_entry_agrees_with_s4ext_and_cmake():
    entry = json.loads((ROOT / "RadGSReg.json").read_text(encoding="utf-8"))
    s4ext, cm = _s4ext(), _cmake_extension_vars()
    assert entry["category"] == s4ext["category"] == cm["EXTENSION_CATEGORY"] == "Registration"
    deps = [] if s4ext.get("depends", "NA") == "NA" else s4ext["depends"].split()
    assert entry.get("build_dependencies", []) == deps == cm["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    assert entry.get("scm_type", "git") == s4ext["scm"]
    assert entry["scm_url"] == s4ext["scmurl"]
    assert entry.get("build_subdirectory", ".") == s4ext.get("build_subdirectory", ".")
    assert entry.get("enabled", True) == (s4ext.get("enabled", "1") == "1")
    assert s4ext.get("homepage", "") == cm["EXTENSION_HOMEPAGE"]
    assert s4ext.get("iconurl", "") == cm["EXTENSION_ICONURL"]


def test_local_scm_points_at_this_checkout():
    """No published repository yet: "local", the source tree relative to
    Slicer_LOCAL_EXTENSIONS_DIR (Extensions/CMake/SlicerBlockBuildPackageAndUploadExtensions.cmake).
    With that folder and Slicer_EXTENSION_DESCRIPTION_DIR both set to this checkout, "."
    is the extension itself, and RadGSReg.json is the only catalog entry found there."""
    entry = json.loads((ROOT / "RadGSReg.json").read_text(encoding="utf-8"))
    assert entry["scm_type"] == "local" and entry["scm_url"] == "."
    source = ROOT / entry["scm_url"]
    assert re.search(r"^project\(RadGSReg\)", (source / "CMakeLists.txt").read_text(encoding="utf-8"), re.M)
    assert sorted(p.name for p in ROOT.glob("*.json")) == ["RadGSReg.json"]


def test_no_urls_the_project_does_not_own():
    """No placeholder homepage/repository/icon URLs: the only URL allowed is Slicer's schema."""
    for name in ("CMakeLists.txt", "RadGSReg/CMakeLists.txt", "RadGSReg.s4ext", "RadGSReg.json"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert not re.search(r"github(usercontent)?\.com/RadGSReg", text), name
        for url in re.findall(r"https?://[^\s\"')]+", text):
            assert url.startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"), (name, url)


def test_licence_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split() == (ROOT / "Resources" / "SampleData" / "LICENSE").read_text(encoding="utf-8").split()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
