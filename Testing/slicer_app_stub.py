"""Import ``RadGSReg/RadGSReg.py`` (the Slicer module file) on slicer-core, without the app.

slicer-core gives real MRML but none of Slicer's Qt side (``qt``, ``ctk``, ``slicer.app``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n``). This
helper puts minimal stand-ins for exactly those into ``sys.modules`` while the module file
is imported, so that its module-level code, its parameter-node annotations and its logic
(which only needs ``slicer.mrmlScene`` and the Qt-free RadGSRegLib) run for real. The
stand-ins do nothing a test relies on except:

- ``parameterNodeWrapper`` returns the class unchanged (its annotations are then read with
  ``typing.get_type_hints``); ``Choice`` / ``WithinRange`` / ``Minimum`` / ``Maximum`` /
  ``Default`` keep their arguments (``.choices``, ``.minimum``, ``.maximum``), as Slicer's do;
- ``slicer.app.testingEnabled()`` is True (Slicer's ``--testing``);
- ``ScriptedLoadableModuleLogic`` is an empty base class.
What Slicer itself enforces about them is encoded in ``test_slicer_module.py``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "RadGSReg" / "RadGSReg.py"


class _Annotation:
    def __init__(self, *args):
        self.args = args


class Choice(_Annotation):
    def __init__(self, choices):
        super().__init__(choices)
        self.choices = list(choices)


class WithinRange(_Annotation):
    def __init__(self, minimum, maximum):
        super().__init__(minimum, maximum)
        self.minimum, self.maximum = minimum, maximum


class Minimum(_Annotation):
    def __init__(self, minimum):
        super().__init__(minimum)
        self.minimum = minimum


class Maximum(_Annotation):
    def __init__(self, maximum):
        super().__init__(maximum)
        self.maximum = maximum


class Default(_Annotation):
    def __init__(self, value):
        super().__init__(value)
        self.value = value


class _App:
    def __init__(self, temporary_path):
        self.temporaryPath = str(temporary_path)

    def testingEnabled(self):
        return True

    def connect(self, *args):
        pass


class _Base:
    def __init__(self, *args, **kwargs):
        pass


def _stub_modules(slicer) -> dict:
    qt = types.ModuleType("qt")
    ctk = types.ModuleType("ctk")
    for name in ("QTimer", "QFileDialog", "QWidget"):
        setattr(qt, name, type(name, (_Base,), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    for c in (Choice, WithinRange, Minimum, Maximum, Default):
        setattr(pnw, c.__name__, c)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (_Base,), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    return {"qt": qt, "ctk": ctk, "slicer.parameterNodeWrapper": pnw, "slicer.ScriptedLoadableModule": slm,
            "slicer.i18n": i18n}


@contextlib.contextmanager
def module_file(scene, temporary_path):
    """Yield the imported module file (a fresh module object), with ``slicer.mrmlScene`` =
    ``scene`` and the stand-ins installed; everything is restored afterwards."""
    import slicer

    stubs = _stub_modules(slicer)
    saved_modules = {k: sys.modules.get(k) for k in stubs}
    saved_attrs = {k: getattr(slicer, k, None) for k in ("mrmlScene", "app")}
    sys.modules.update(stubs)
    slicer.mrmlScene = scene
    slicer.app = _App(temporary_path)
    try:
        spec = importlib.util.spec_from_file_location("RadGSReg_module_under_test", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k, v in saved_attrs.items():
            if v is None:
                if hasattr(slicer, k):
                    delattr(slicer, k)
            else:
                setattr(slicer, k, v)
