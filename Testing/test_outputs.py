"""Output locations: nothing lost (inputs and other people's files are never replaced),
nothing run (a refused location fails before the work), nothing silent (messages name the
option and path), and no half-written output (atomic writes, interruption included)."""
import datetime
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_cases import tiny_case

from RadGSRegLib import __version__, io
from RadGSRegLib.errors import OutputError
from RadGSRegLib.geometry import biplanar_views, pose_to_matrix
from RadGSRegLib.io import MARKER, OutputExistsError, check_output, check_output_file
from RadGSRegLib.io.atomic import atomic_dir, atomic_file
from RadGSRegLib.io.outputs import why_not_ours, why_not_own_file, write_json, write_marker, write_png


# ------------------------------------------------------------------ helpers
def _tree(root: Path) -> dict:
    """{relative path: sha256 of a file, or "dir"} for everything under root, hidden names included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = "link" if os.path.islink(p) else hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _tiny_case(seed=0):
    return tiny_case(np.random.default_rng(seed), extra={"generator": {"source": "tiny"}})


def _result(x=1.0):
    return io.Result(pose_to_matrix([x, 0, 0, 1, 2, 3]), runtime_s={"total": 0.1})


def _refused(fn, match, root, exc=OutputError):
    """fn raises ``exc`` matching ``match`` and leaves everything under root byte-identical."""
    before = _tree(root)
    with pytest.raises(exc, match=match):
        fn()
    assert _tree(root) == before


# ------------------------------------------------------------------ markers
def test_every_folder_writer_leaves_a_marker(tmp_path):
    io.write_case(_tiny_case(), tmp_path / "case")
    io.write_result(_result(), tmp_path / "res")
    with atomic_dir(tmp_path / "fit", kind="fit") as tmp:
        (tmp / "fit.json").write_text("{}")
    for name, kind in (("case", "case"), ("res", "result"), ("fit", "fit")):
        m = json.loads((tmp_path / name / MARKER).read_text())
        assert m["kind"] == kind and m["version"] == __version__ and m["written_by"] == "RadGSReg"
        assert datetime.datetime.fromisoformat(m["created"]).tzinfo is not None
        assert why_not_ours(tmp_path / name, kind) is None
    assert io.read_case(tmp_path / "case").vertebra_label == 29          # the marker does not disturb readers
    assert io.read_result(tmp_path / "res").runtime_s == {"total": 0.1}


# ------------------------------------------------------------------ rule: exists -> --overwrite
def test_existing_output_needs_overwrite_then_replaces_our_own(tmp_path):
    out = tmp_path / "res"
    io.write_result(_result(1.0), out)
    _refused(lambda: check_output(out, "result", overwrite=False, option="--out"),
             r"--out .*res exists; pass --overwrite to replace it", tmp_path, OutputExistsError)
    _refused(lambda: io.write_result(_result(2.0), out), "overwrite", tmp_path, FileExistsError)   # still a FileExistsError
    io.write_result(_result(2.0), out, overwrite=True)                  # our own result: replaced
    assert io.read_result(out).T_ct_to_carm[0, 3] == pytest.approx(pose_to_matrix([2.0, 0, 0, 1, 2, 3])[0, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]        # no temp, no old copy left


def test_empty_folder_is_free(tmp_path):
    (tmp_path / "res").mkdir()
    check_output(tmp_path / "res", "result", overwrite=False)
    io.write_result(_result(), tmp_path / "res")
    assert (tmp_path / "res" / "result.json").is_file()


# ------------------------------------------------------------------ rule: only our own output of that kind
def test_folder_with_someone_elses_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    (out / "result.json").write_text("{}")
    _refused(lambda: check_output(out, "result", overwrite=True, option="--out"),
             r"--out .*mine holds files RadGSReg did not write \(e\.g\. notes\.txt\)", tmp_path)
    _refused(lambda: io.write_result(_result(), out, overwrite=True), "notes.txt", tmp_path)
    # without --overwrite the real reason comes first (passing --overwrite would not help)
    _refused(lambda: check_output(out, "result", overwrite=False), "did not write .*even with --overwrite", tmp_path)


def test_a_file_added_to_our_folder_makes_it_foreign(tmp_path):
    out = tmp_path / "res"
    io.write_result(_result(), out)
    (out / "notes.txt").write_text("keep me")
    _refused(lambda: io.write_result(_result(), out, overwrite=True), r"did not write \(e\.g\. notes\.txt\)", tmp_path)


def test_another_kind_is_refused(tmp_path):
    io.write_case(_tiny_case(), tmp_path / "case")
    _refused(lambda: io.write_result(_result(), tmp_path / "case", overwrite=True),
             "is a RadGSReg case folder, not a result folder", tmp_path)


def test_legacy_folders_without_marker(tmp_path):
    # a result folder an earlier version wrote: only result-folder files -> ours
    io.write_result(_result(), tmp_path / "old")
    (tmp_path / "old" / MARKER).unlink()
    assert why_not_ours(tmp_path / "old", "result") is None
    io.write_result(_result(3.0), tmp_path / "old", overwrite=True)
    assert io.read_marker(tmp_path / "old")["kind"] == "result"
    # result-folder file names but not the identifying result.json -> not ours
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "recon.nrrd").write_bytes(b"x")
    _refused(lambda: check_output(tmp_path / "partial", "result", overwrite=True),
             "nothing in it shows RadGSReg wrote it", tmp_path)
    # the same file names written by hand prove nothing: a case folder without our generator record
    hand = _tiny_case()
    hand.extra = {}
    io.write_case(hand, tmp_path / "mine")
    (tmp_path / "mine" / MARKER).unlink()
    _refused(lambda: check_output(tmp_path / "mine", "case", overwrite=True), "nothing in it shows", tmp_path)
    # nor does a phantom folder: ct.nrrd + seg.nrrd could be anybody's
    (tmp_path / "ph").mkdir()
    for n in ("ct.nrrd", "seg.nrrd"):
        (tmp_path / "ph" / n).write_bytes(b"x")
    _refused(lambda: check_output(tmp_path / "ph", "phantom", overwrite=True), "nothing in it shows", tmp_path)
    # a legacy suite: case folders + summary.json; a stranger's file deep inside is named
    io.write_case(_tiny_case(), tmp_path / "suite" / "case_000")
    (tmp_path / "suite" / "case_000" / MARKER).unlink()
    (tmp_path / "suite" / "summary.json").write_text("[]")
    (tmp_path / "suite" / "case_000" / "preview.png").write_bytes(b"png")   # `show` writes this: ours
    assert why_not_ours(tmp_path / "suite", "suite") is None
    (tmp_path / "suite" / "case_000" / "draft.docx").write_bytes(b"x")
    _refused(lambda: check_output(tmp_path / "suite", "suite", overwrite=True), r"case_000/draft\.docx", tmp_path)


def test_training_run_folder_layout(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({k: 1 for k in ("stage", "out", "data_cache", "lambda_ssim",
                                                               "input_rot_deg", "rec_epochs", "seed")}))
    (run / "log.jsonl").write_text("")
    (run / "data" / "samples-0123456789abcdef.pt").write_bytes(b"x")
    (run / ".model.pt.k2j3h4.pt").write_bytes(b"x")          # our own interrupted atomic write
    check_output(run, "train", overwrite=True)
    write_marker(run, "train")
    assert io.read_marker(run)["kind"] == "train"
    (run / "my_notes.md").write_text("x")
    _refused(lambda: check_output(run, "train", overwrite=True), "my_notes.md", tmp_path)


# ------------------------------------------------------------------ rule: inputs are never written
def test_output_equal_to_the_input_case_is_refused(tmp_path):
    case = tmp_path / "case"
    io.write_case(_tiny_case(), case)
    _refused(lambda: check_output(case, "case", overwrite=True, inputs=[case], option="--out"),
             r"--out .*case is the input .*case; writing there would destroy it", tmp_path)
    _refused(lambda: io.write_case(_tiny_case(1), case, overwrite=True, inputs=[case]), "is the input", tmp_path)
    # through a symbolic link too
    (tmp_path / "link").symlink_to(case, target_is_directory=True)
    _refused(lambda: check_output(tmp_path / "link", "case", overwrite=True, inputs=[case]), "is the input", tmp_path)


def test_output_inside_an_input_is_refused(tmp_path):
    case = tmp_path / "case"
    io.write_case(_tiny_case(), case)
    _refused(lambda: check_output(case / "res", "result", overwrite=True, inputs=[case], option="--out"),
             "lies inside the input", tmp_path)
    _refused(lambda: io.write_result(_result(), case / "res", inputs=[case]), "lies inside the input", tmp_path)


def test_output_holding_an_input_is_refused(tmp_path):
    suite = tmp_path / "suite"
    io.write_case(_tiny_case(), suite / "case_000")
    (suite / "summary.json").write_text("[]")
    assert why_not_ours(suite, "suite") is None                  # ours, and yet:
    _refused(lambda: check_output(suite, "suite", overwrite=True, inputs=[suite / "case_000" / "ct.nrrd"],
                                  option="--out"),
             "holds the input .*ct.nrrd; replacing the folder would delete it", tmp_path)


# ------------------------------------------------------------------ rule: the right type, writable
def test_file_where_a_folder_is_wanted_and_vice_versa(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    _refused(lambda: check_output(tmp_path / "f.txt", "result", overwrite=True, option="--out"),
             "is a file, not a folder", tmp_path)
    _refused(lambda: check_output(tmp_path / "f.txt" / "res", "result", overwrite=True),
             "f.txt is a file, not a folder, so nothing can be written under it", tmp_path)
    (tmp_path / "d.png").mkdir()
    _refused(lambda: check_output_file(tmp_path / "d.png", "preview", overwrite=True, option="--out"),
             "is a folder, not a file", tmp_path)


def test_unwritable_location_fails_before_the_work(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):                 # root writes anyway: the chmod proves nothing there
            _refused(lambda: check_output(ro / "res", "result", overwrite=False, option="--out"),
                     r"--out .*: cannot write in .*ro \(Permission denied\)", tmp_path)
    finally:
        ro.chmod(0o755)
    # the probe's failure, whoever runs the test: a refusal before any work
    from RadGSRegLib.io import outputs

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    _refused(lambda: check_output(ro / "res", "result", overwrite=False), r"cannot write in .*ro \(Permission denied\)",
             tmp_path)
    _refused(lambda: check_output_file(ro / "x.json", "evaluation", overwrite=False), "cannot write in", tmp_path)


def test_refusal_comes_before_the_work(tmp_path):
    from RadGSRegLib.cases import CaseGenConfig, generate_cases
    from RadGSRegLib.evaluate import evaluate_results
    from RadGSRegLib.preview import save_montage

    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("x")
    (tmp_path / "foreign.png").write_bytes(b"not ours")

    def never(i):
        raise AssertionError("work started")

    # no cases, no results: scoring would fail with FileNotFoundError; the location is refused first
    _refused(lambda: evaluate_results(tmp_path / "none", tmp_path / "none2", json_path=tmp_path / "f.txt" / "e.json"),
             "is a file, not a folder", tmp_path)
    _refused(lambda: generate_cases(never, ["L3"], 2, tmp_path / "theirs", CaseGenConfig(), overwrite=True),
             "notes.txt", tmp_path)
    _refused(lambda: save_montage(None, tmp_path / "foreign.png"), "was not written by RadGSReg", tmp_path)


# ------------------------------------------------------------------ single files: PNG and JSON
def test_png_recognition(tmp_path):
    from PIL import Image

    img = np.zeros((8, 8, 3), np.uint8)
    write_png(img, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.text["Software"] == f"RadGSReg {__version__}"
        assert json.loads(im.text["RadGSReg"])["kind"] == "preview"
    assert why_not_own_file(tmp_path / "p.png", "preview") is None
    _refused(lambda: write_png(img, tmp_path / "p.png", overwrite=False), "exists; pass --overwrite", tmp_path)
    write_png(img + 1, tmp_path / "p.png", overwrite=True)               # our own: replaced
    Image.fromarray(img).save(tmp_path / "holiday.png")                  # a PNG someone else made
    _refused(lambda: check_output_file(tmp_path / "holiday.png", "preview", overwrite=True, option="--out"),
             r"--out .*holiday.png was not written by RadGSReg \(no 'Software: RadGSReg'", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.png", "p.png"]


def test_show_preview_inside_the_case(tmp_path):
    from PIL import Image

    case = tmp_path / "case"
    io.write_case(_tiny_case(), case)
    # show's default CASE/preview.png: allowed directly in the case folder, nowhere deeper
    check_output_file(case / "preview.png", "preview", overwrite=False, inputs=[case], allow_in=[case])
    _refused(lambda: check_output_file(case / "sub" / "p.png", "preview", overwrite=True, inputs=[case],
                                       allow_in=[case]), "lies inside the input", tmp_path)
    # never onto a case file
    _refused(lambda: check_output_file(case / "ct.nrrd", "preview", overwrite=True, inputs=[case], allow_in=[case]),
             "was not written by RadGSReg", tmp_path)
    # a legacy preview (no text chunk) in our case folder counts as ours
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(case / "preview.png")
    check_output_file(case / "preview.png", "preview", overwrite=True, inputs=[case], allow_in=[case])
    # and the case stays ours with a preview in it
    assert why_not_ours(case, "case") is None
    # the same for a demo folder an earlier version wrote (case/, result/, preview.png)
    demo = tmp_path / "demo"
    io.write_case(_tiny_case(), demo / "case")
    io.write_result(_result(), demo / "result")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(demo / "preview.png")
    assert why_not_ours(demo, "demo") is None
    check_output_file(demo / "preview.png", "preview", overwrite=True)


def test_json_recognition(tmp_path):
    write_json(tmp_path / "e.json", {"summary": {"n": 1}}, "evaluation")
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["radgsreg"]["kind"] == "evaluation" and data["radgsreg"]["version"] == __version__
    assert data["summary"] == {"n": 1}
    write_json(tmp_path / "e.json", {"summary": {"n": 2}}, "evaluation")          # reports: our own replaced
    _refused(lambda: write_json(tmp_path / "e.json", {}, "evaluation", overwrite=False), "exists", tmp_path)
    # someone's JSON, e.g. a case's case.json
    io.write_case(_tiny_case(), tmp_path / "case")
    _refused(lambda: check_output_file(tmp_path / "case" / "case.json", "evaluation", overwrite=True, option="--json"),
             r'--json .*case.json was not written by RadGSReg \(it has no top-level "radgsreg" key\)', tmp_path)
    _refused(lambda: check_output_file(tmp_path / "case" / "case.json", "evaluation", overwrite=False),
             "was not written by RadGSReg", tmp_path)
    # another of our kinds
    write_json(tmp_path / "drr.json", {"workload": "x"}, "bench-drr")
    _refused(lambda: check_output_file(tmp_path / "drr.json", "evaluation", overwrite=True),
             "is a RadGSReg bench-drr file, not evaluation", tmp_path)
    # legacy: an evaluation.json from before the stamp (its exact top-level keys)
    (tmp_path / "old.json").write_text(json.dumps({"cases": "c", "results": "r", "summary": {}, "rows": [],
                                                   "missing": []}))
    assert why_not_own_file(tmp_path / "old.json", "evaluation") is None
    # not valid JSON at all
    (tmp_path / "bad.json").write_text("{")
    _refused(lambda: check_output_file(tmp_path / "bad.json", "evaluation", overwrite=True), "not a JSON file", tmp_path)


def test_evaluate_json_location(tmp_path):
    cases, results = tmp_path / "cases", tmp_path / "results"
    io.write_case(_tiny_case(), cases / "case_000")
    io.write_result(_result(), results / "case_000")
    ok = dict(inputs=[cases, results], allow_in=[results], option="--json")
    check_output_file(results / "evaluation.json", "evaluation", overwrite=True, **ok)     # the default: fine
    _refused(lambda: check_output_file(cases / "case_000" / "case.json", "evaluation", overwrite=True, **ok),
             "lies inside the input", tmp_path)
    _refused(lambda: check_output_file(results / "case_000" / "e.json", "evaluation", overwrite=True, **ok),
             "lies inside the input", tmp_path)


# ------------------------------------------------------------------ atomic writes and interruption
def test_interrupted_atomic_dir_leaves_no_target_and_no_temp(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out", kind="result") as tmp:
            (tmp / "result.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_interrupted_replacement_keeps_the_old_folder(tmp_path):
    io.write_result(_result(1.0), tmp_path / "res")
    before = _tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "res", True, kind="result") as tmp:
            assert _tree(tmp_path / "res") == {k[4:]: v for k, v in before.items() if k.startswith("res/")}
            (tmp / "result.json").write_text("{}")
            raise KeyboardInterrupt
    assert _tree(tmp_path) == before


def test_interrupted_atomic_file_and_suite(tmp_path):
    from RadGSRegLib.cases import CaseGenConfig, generate_cases
    from RadGSRegLib.simulate import XraySimConfig

    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "x.json") as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    c = _tiny_case()

    def sources(i):
        if i == 1:
            raise KeyboardInterrupt
        return c.ct, c.seg, "tiny"

    cfg = CaseGenConfig(pixels=16, detector_mm=200.0, sim=XraySimConfig.ideal())
    with pytest.raises(KeyboardInterrupt):
        generate_cases(sources, ["L3"], 3, tmp_path / "suite", cfg, labels={"L3": 29})
    assert list(tmp_path.iterdir()) == []              # case_000 was written, but only in the hidden temp


def test_killed_write_leaves_nothing_that_looks_complete(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        from RadGSRegLib.io.atomic import atomic_dir
        with atomic_dir({str(tmp_path / "suite" / "case_000")!r}, kind="case") as tmp:
            (tmp / "case.json").write_text("{{}}")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0
    names = os.listdir(tmp_path / "suite")
    assert names and all(n.startswith(".case_000.") for n in names)    # only a hidden temp
    from RadGSRegLib.evaluate import case_dirs

    assert case_dirs(tmp_path / "suite") == []                          # and it is not taken for a case


def test_generated_suite_is_marked_and_summarised(tmp_path):
    from RadGSRegLib.cases import CaseGenConfig, generate_cases
    from RadGSRegLib.simulate import XraySimConfig

    c = _tiny_case()
    cfg = CaseGenConfig(pixels=16, detector_mm=200.0, sim=XraySimConfig.ideal())
    rows = generate_cases(lambda i: (c.ct, c.seg, "tiny"), ["L3"], 2, tmp_path / "s", cfg, labels={"L3": 29},
                          inputs=[tmp_path / "ct.nrrd"])
    assert json.loads((tmp_path / "s" / "summary.json").read_text()) == rows
    assert io.read_marker(tmp_path / "s")["kind"] == "suite"
    assert io.read_marker(tmp_path / "s" / "case_001")["kind"] == "case"
    _refused(lambda: generate_cases(lambda i: (c.ct, c.seg, "tiny"), ["L3"], 1, tmp_path / "s", cfg,
                                    labels={"L3": 29}), "exists; pass --overwrite", tmp_path, FileExistsError)
    generate_cases(lambda i: (c.ct, c.seg, "tiny"), ["L3"], 1, tmp_path / "s", cfg, labels={"L3": 29}, overwrite=True)
    assert sorted(os.listdir(tmp_path / "s")) == [MARKER, "case_000", "summary.json"]   # replaced whole
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_write_geometry_is_atomic(tmp_path):
    views = biplanar_views(pixels=(24, 20), detector_mm=(120.0, 100.0))
    io.write_geometry(views, tmp_path / "geometry.json")
    io.write_geometry(views, tmp_path / "geometry.json", image_kind="intensity")      # replaces, whole
    assert os.listdir(tmp_path) == ["geometry.json"]
    assert io.read_geometry(tmp_path / "geometry.json")[2] == "intensity"


def test_ctrl_c_during_the_final_rename_is_held_until_it_is_done():
    import signal

    from RadGSRegLib.io.atomic import _signals_deferred

    # Python's own Ctrl-C handler, whatever the runner inherited (a job started in the
    # background of a non-interactive shell ignores SIGINT: then there is no KeyboardInterrupt to hold)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        done = []
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("rename finished")             # not cut short
        assert done == ["rename finished"]
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_sigterm_during_the_final_rename_is_held_until_it_is_done():
    """The command line's SIGTERM handler (cli._interruptible: KeyboardInterrupt) runs after
    the rename, not inside it."""
    import signal

    from RadGSRegLib.io.atomic import _signals_deferred

    got = []

    def handler(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    inherited = signal.signal(signal.SIGTERM, handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("rename finished")             # not cut short
        assert done == ["rename finished"] and got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, inherited)
