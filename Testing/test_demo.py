"""The demo (RadGSRegLib.demo.run_demo and `radgsreg demo`). The registration itself is
tested in test_register.py; here it is replaced by a stand-in that lands half-way between
the initial guess and the truth, so that the demo's own work (the case made, written, read
back without its truth, the result and picture written, both errors) runs in seconds."""
import json

import pytest

import RadGSRegLib.register as register
from RadGSRegLib.metrics import truth_errors
from RadGSRegLib.cli import main
from RadGSRegLib.demo import run_demo
from RadGSRegLib.geometry import matrix_to_pose, pose_to_matrix
from RadGSRegLib.io import Result, read_case, read_result
from RadGSRegLib.levels import LevelError


@pytest.fixture()
def halfway(monkeypatch):
    """register.run replaced: records what it was given, returns the pose half-way from the
    initial guess to the truth (read, as only a test may, from the case folder it came from)."""
    seen = []

    def run(case, config=None, log=None, **kw):
        seen.append(case)
        truth = read_case(case.path, ground_truth=True)
        T = pose_to_matrix((matrix_to_pose(case.initial_guess) + matrix_to_pose(truth.ground_truth)) / 2)
        log("  stand-in registration")
        return Result(T_ct_to_carm=T, runtime_s={"total": 0.5}, info={"warnings": ["doubtful: a stand-in"]})

    monkeypatch.setattr(register, "run", run)
    return seen


def test_run_demo_writes_the_folder_and_scores_both_poses(tmp_path, halfway):
    lines = []
    d = run_demo(tmp_path / "demo", level="l3", pixels=48, seed=2, log=lines.append)
    # the case given to registration never holds the truth
    assert len(halfway) == 1 and halfway[0].ground_truth is None
    assert [ln[:4] for ln in lines if ln[1:2] == "/"] == ["1/4 ", "2/4 ", "3/4 ", "4/4 "]
    assert "  stand-in registration" in lines
    assert lines[0] == "1/4 loading the bundled lumbar CT (example_ct.nii.gz, totalseg.nii.gz) ..."
    assert lines[1].startswith("2/4 simulating AP + lateral X-rays (48x48) of L3 at a pose up to ±10 deg / ±20 mm")
    # the folder: the case (with its truth), the result, the picture, marked as a demo
    out = tmp_path / "demo"
    assert sorted(p.name for p in out.iterdir()) == [".radgsreg.json", "case", "preview.png", "result"]
    assert json.loads((out / ".radgsreg.json").read_text())["kind"] == "demo"
    truth = read_case(out / "case", ground_truth=True)
    res = read_result(out / "result")
    assert truth.extra["generator"]["source"].startswith("RadGSReg lumbar sample CT")
    # the numbers returned are the case's own errors
    assert (d.out, d.level, d.label) == (out, "L3", 29)
    assert d.before == truth_errors(truth, truth.initial_guess)
    assert d.after == truth_errors(truth, res.T_ct_to_carm)
    assert 0 < d.after["mtre_mm"] < d.before["mtre_mm"]
    assert d.register_s == 0.5 and d.warnings == ["doubtful: a stand-in"] and d.seconds > 0


def test_demo_command_prints_the_summary(tmp_path, halfway, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--pixels", "48", "--seed", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1/4 loading the bundled lumbar CT")
    case_line, before, after, done = out[-4:]
    assert case_line == (f"case: {tmp_path / 'd' / 'case'} (L3, label 29); result: {tmp_path / 'd' / 'result'}; "
                         f"picture: {tmp_path / 'd' / 'preview.png'}")
    assert before.startswith("initial guess: mTRE ") and " deg, translation " in before
    assert after.startswith("registered:    mTRE ") and after.endswith(" in 0.5 s; warning: doubtful: a stand-in")
    assert done.startswith("done in ") and done.endswith(" s")


def test_demo_refuses_a_level_the_phantom_lacks_before_any_work(tmp_path, halfway, capsys):
    assert main(["demo", "--phantom", "--level", "C3", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "radgsreg demo: error: --level C3: the phantom spans L1, L2, L3, L4, L5 (see radgsreg demo --help)" in err
    assert not (tmp_path / "d").exists() and not halfway
    with pytest.raises(LevelError, match="the phantom spans"):
        run_demo(tmp_path / "d", level="S1", phantom=True)
    assert not (tmp_path / "d").exists()


def test_a_demo_level_absent_from_the_ct_is_an_input_error(tmp_path, halfway, capsys):
    assert main(["demo", "--level", "T5", "--out", str(tmp_path / "d"), "--pixels", "32"]) == 1
    assert "T5" in capsys.readouterr().err and not (tmp_path / "d").exists() and not halfway
