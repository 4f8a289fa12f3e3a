"""The shipped files (RadGSRegLib.resources) in every layout: the source checkout here, an
installed wheel below (the Slicer extension's layout: test_slicer_extension_build.py).

The wheel test builds the sdist and, from it, the wheel of a copy of this checkout (offline:
the build backend already installed, no index), installs the wheel alone into a fresh venv
in a temporary folder whose heavy dependencies come from this interpreter's site-packages
(a .pth line: a path only, so this venv's editable-install finder does not run there), and
runs from a folder outside the checkout: RadGSRegLib must come from the new venv and find
the weights and the sample CT as package data, byte for byte what Resources/ holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from RadGSRegLib.register.config import default_model
from RadGSRegLib.resources import (PACKAGE_DATA_DIR, ResourceNotFoundError, find_resource, resource_path,
                                   resource_roots)
from RadGSRegLib.sample_data import sample_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "Resources"
#: Resources subfolders a wheel carries (Icons and UI are the Slicer module's, not in the wheel)
WHEEL_SUBDIRS = ("Models", "SampleData")
#: files of those folders that are not shipped (the maintainers' script that derived the sample)
NOT_SHIPPED = {"SampleData/fetch_sample_data.py"}
#: what the copy of the checkout leaves out: local caches, environments and outputs
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                 ".pytest_cache", "runs", "demo_out", "bench_out", ".whl", ".gl", ".peers")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sums() -> dict[str, str]:
    lines = (RESOURCES / "SampleData" / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def _shipped() -> set[str]:
    """Resource names a wheel must carry: every file of the shipped subfolders but NOT_SHIPPED."""
    out = set()
    for sub in WHEEL_SUBDIRS:
        for p in (RESOURCES / sub).rglob("*"):
            rel = p.relative_to(RESOURCES).as_posix()
            if p.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                out.add(rel)
    return out - NOT_SHIPPED


# ---------------------------------------------------------------- the helper, in this checkout
def test_checkout_finds_its_top_level_resources():
    assert resource_path("Models/radgsreg_stage1.pt") == RESOURCES / "Models" / "radgsreg_stage1.pt"
    assert default_model() == RESOURCES / "Models" / "radgsreg_stage1.pt"
    assert resource_path("UI/RadGSReg.ui") == RESOURCES / "UI" / "RadGSReg.ui"      # Slicer-only, still found here
    if "RADGSREG_SAMPLE_DATA" not in os.environ:
        assert sample_data_dir() == RESOURCES / "SampleData"
    roots = [p for p, _ in resource_roots()]
    assert roots == [ROOT / "RadGSRegLib" / PACKAGE_DATA_DIR, RESOURCES]


def test_missing_resource_names_what_and_where():
    with pytest.raises(ResourceNotFoundError) as err:
        resource_path("Models/no_such_weights.pt")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)                 # the CLI's OSError path: one line, exit 1
    assert "'Models/no_such_weights.pt'" in msg
    looked = [ROOT / "RadGSRegLib" / PACKAGE_DATA_DIR / "Models" / "no_such_weights.pt",
              RESOURCES / "Models" / "no_such_weights.pt"]
    assert err.value.looked_at == looked and all(str(p) in msg for p in looked), msg
    assert "package data" in msg and "source checkout" in msg and "Slicer extension" in msg
    assert find_resource("Models/no_such_weights.pt") is None
    with pytest.raises(ResourceNotFoundError, match="set it up like this"):
        resource_path("nope.txt", hint="set it up like this")


def test_a_folder_is_not_a_resource_file():
    assert find_resource("SampleData") is None


@pytest.mark.parametrize("name", ["", ".", "/etc/passwd", "../README.md", "Models/../../README.md", "Models\\x.pt"])
def test_resource_names_stay_inside_resources(name):
    with pytest.raises(ValueError, match="relative POSIX path inside Resources/"):
        find_resource(name)


def test_sample_data_override_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RADGSREG_SAMPLE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        sample_data_dir()
    msg = str(err.value)
    assert "RADGSREG_SAMPLE_DATA" in msg and str(tmp_path / "example_ct.nii.gz") in msg
    for name in ("example_ct.nii.gz", "totalseg.nii.gz"):
        shutil.copy(RESOURCES / "SampleData" / name, tmp_path / name)
    assert sample_data_dir() == tmp_path


# ---------------------------------------------------------------- an installed wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this checkout, built from its sdist, offline."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    sdist_dir = tmp / "sdist"
    res = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                          "print(b.build_sdist(sys.argv[1]))", str(sdist_dir)],
                         cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (sdist,) = sdist_dir.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        t.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--no-cache-dir", "-q", "-w", str(tmp / "wheels"), str(unpacked)],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = (tmp / "wheels").glob("radgsreg-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_the_package_and_the_shipped_resources(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {i.filename for i in z.infolist() if not i.is_dir()}
        data = {n[len(f"RadGSRegLib/{PACKAGE_DATA_DIR}/"):]: z.getinfo(n).file_size for n in names
                if n.startswith(f"RadGSRegLib/{PACKAGE_DATA_DIR}/")}
    assert set(data) == _shipped(), (sorted(set(data) - _shipped()), sorted(_shipped() - set(data)))
    for rel, size in data.items():
        assert size == (RESOURCES / rel).stat().st_size, rel
    # every module of the package (a subpackage the build misses would fail here)
    src = {p.relative_to(ROOT).as_posix() for p in (ROOT / "RadGSRegLib").rglob("*.py") if "__pycache__" not in p.parts}
    assert src <= names, sorted(src - names)
    # the DiffDRR peer's pinned environment, named by the bench's set-up commands (package data of bench)
    assert "RadGSRegLib/bench/diffdrr-requirements.txt" in names
    # nothing else at the top: the package and its metadata (no Resources/, RadGSReg/, Testing/)
    assert {n.split("/")[0] for n in names} == {"RadGSRegLib", "-".join(wheel.name.split("-")[:2]) + ".dist-info"}
    assert wheel.stat().st_size < 12 * 2**20, f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB"


_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import RadGSRegLib
    from RadGSRegLib.resources import resource_path
    from RadGSRegLib.register.config import default_model
    from RadGSRegLib import sample_data
    import SimpleITK as sitk
    import torch

    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    weights, ct = default_model(), resource_path("SampleData/example_ct.nii.gz")
    sd = sample_data.lumbar_ct()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sd.ct))
    reader.ReadImageInformation()
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    tensors = [v for v in state["state_dict"].values() if torch.is_tensor(v)]
    config = json.loads(resource_path("Models/configs/stage1_tiny.json").read_text())
    print(json.dumps({
        "package": RadGSRegLib.__file__,
        "modules": sorted(m.__file__ for n, m in list(sys.modules.items())
                          if n.split(".")[0] == "RadGSRegLib" and getattr(m, "__file__", None)),
        "weights": str(weights), "ct": str(ct), "sample_dir": str(sample_data.sample_data_dir()),
        "sha256": {"weights": sha(weights), "example_ct.nii.gz": sha(sd.ct), "totalseg.nii.gz": sha(sd.seg),
                   "LICENSE": sha(sd.license)},
        "checksums": {n: sha(sd.ct.parent / n) == d for n, d in sample_data.recorded_checksums().items()},
        "ct_size": list(reader.GetSize()), "ct_spacing": list(reader.GetSpacing()),
        "format": state["format"], "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors)),
        "config_keys": sorted(config),
    }))
    """)


@pytest.mark.slow
def test_installed_wheel_finds_weights_and_sample_ct(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                          "--no-cache-dir", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies from this interpreter's site-packages: plain paths (a .pth line does not run the
    # .pth files of the folder it adds, so an editable install of the checkout stays invisible)
    deps = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
            if Path(p).is_dir() and Path(p).resolve() != site.resolve()]
    (site / "radgsreg_test_deps.pth").write_text("\n".join(deps) + "\n")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "RADGSREG_SAMPLE_DATA")}
    env.update(PYTHONNOUSERSITE="1")
    res = subprocess.run([str(py), "-c", _CHILD], cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])

    # the package is the installed one, not the checkout
    pkg = (site / "RadGSRegLib").resolve()
    assert Path(out["package"]).resolve() == pkg / "__init__.py"
    assert out["modules"] and all(Path(m).resolve().is_relative_to(pkg) for m in out["modules"]), out["modules"]
    data = pkg / PACKAGE_DATA_DIR
    assert Path(out["weights"]) == data / "Models" / "radgsreg_stage1.pt"
    assert Path(out["ct"]) == data / "SampleData" / "example_ct.nii.gz"
    assert Path(out["sample_dir"]) == data / "SampleData"
    # the same bytes as the checkout's files and their recorded checksums
    sums = _sums()
    assert {k: v for k, v in out["sha256"].items() if k != "weights"} == sums
    assert out["checksums"] == {name: True for name in sums}
    assert out["sha256"]["weights"] == _sha256(RESOURCES / "Models" / "radgsreg_stage1.pt")
    # they open: the CT's header (test_sample_data.py: 122 x 101 x 112 at 3 mm), the weights (plain tensors)
    assert out["ct_size"] == [122, 101, 112] and out["ct_spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert out["format"].startswith("radgsreg") and out["tensors"] > 10 and out["parameters"] > 10_000, out
    assert out["config_keys"] == sorted(json.loads((RESOURCES / "Models" / "configs" / "stage1_tiny.json").read_text()))
