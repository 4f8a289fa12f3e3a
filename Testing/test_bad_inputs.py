"""Every row of the bad-input table (Testing/bad_inputs.py) against the command line: the
expected exit code, a message naming the file/field/option, no traceback, inputs
byte-identical, no partial output, no planted code run. And Ctrl-C during a registration:
exit 130 and no result folder that looks complete."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_inputs import ROWS, Workspace, classify, run_row


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace.make(tmp_path_factory.mktemp("bad_inputs"))


def test_the_table_is_long_enough():
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, workspace):
    ws = workspace.fresh(row.id)
    o = run_row(row, ws)
    assert not o.planted_ran, "a planted pickle ran"
    assert not o.traceback and "Traceback" not in o.err, o.traceback or o.err
    assert "internal error" not in o.err, o.err                     # a bug, not a user error
    assert not o.changed, f"inputs changed: {o.changed}"
    assert not o.partial, "a partial output was left behind"
    assert o.code == row.code, (o.code, o.err[-2000:])
    text = (o.out + o.err).lower()
    missing = [w for w in row.words if w.lower() not in text]
    assert not missing, f"the message does not name {missing}: {o.err[-600:] or o.out[-600:]}"
    if row.code:
        errors = [line for line in o.err.splitlines() if "error" in line]
        assert len(errors) == 1, f"expected one error line, got: {o.err[-1000:]}"
    assert classify(row, o) == "clear"


@pytest.mark.skipif(os.name == "nt", reason="SIGINT is POSIX")
def test_ctrl_c_during_a_registration_leaves_no_result(workspace, tmp_path):
    ws = workspace.fresh("ctrl-c")
    out = tmp_path / "res"
    # a search of 9^3 rotations lasts seconds (the default's 65 took 0.3 s on a fast machine:
    # the interrupt came after the result was written), so the signal lands inside it
    cfg = tmp_path / "slow_search.json"
    cfg.write_text(json.dumps({"search": {"rot_deg": [-20, -15, -10, -5, 0, 5, 10, 15, 20]}}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "RadGSRegLib.cli", "register", str(ws.path("case")), "--out",
                             str(out), "--progress", "json", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:                       # wait until the search is under way
        if '"stage": "search"' in line:
            break
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert '"event": "error"' in stdout and '"message": "interrupted"' in stdout
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".res")]
