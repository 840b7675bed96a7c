"""Black-box verification plumbing: query plans and the prediction-command round trip, using tiny
helper scripts as stand-ins for a remote model."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ticketctl.errors import TicketctlError
from ticketctl.protect.blackbox import QueryPlan, plan_queries, run_predict_cmd, split_answers

MODEL_SCRIPT = """
import json, sys
import numpy as np
path = sys.argv[-1]
open({record!r}, "w").write(path)
images = np.load(path)["images"]
assert images.dtype == np.uint8 and images.ndim == 4
print(json.dumps([int(img.mean()) // 26 % 10 for img in images]))
"""


def _label(img: np.ndarray) -> int:
    """The helper model's rule, computed directly."""
    return int(img.mean()) // 26 % 10


def _images(values: list[int], shape: tuple[int, int, int] = (4, 4, 3)) -> np.ndarray:
    out = np.empty((len(values), *shape), dtype=np.uint8)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _script(tmp_path: Path, name: str, body: str) -> str:
    """Write a helper script and return a shell command that runs it with this interpreter."""
    path = tmp_path / name
    path.write_text(body)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"


def _recorder(tmp_path: Path, body: str, name: str = "helper.py") -> tuple[str, Path]:
    """A script that first records the query file path it was given, then runs `body`."""
    record = tmp_path / f"{name}.argv"
    head = f"import sys\nopen({str(record)!r}, 'w').write(sys.argv[-1])\n"
    return _script(tmp_path, name, head + body), record


def _gone(pid: int, wait: float = 3.0) -> bool:
    """True once os.kill(pid, 0) raises ProcessLookupError; a zombie counts as gone too, since a
    killed grandchild waits for init (which may never reap in a container) to collect it.
    `wait` is how long to poll before calling it alive: a loaded machine may take a while."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return True
        except (OSError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --- plan_queries / split_answers -------------------------------------------------------------


def test_plan_positions_cover_all_indices_once():
    triggers, decoys = _images([10, 20, 30, 40, 50]), _images([60, 70, 80, 90, 100])
    plan = plan_queries(triggers, decoys, seed=3)
    assert isinstance(plan, QueryPlan)
    assert plan.images.shape == (10, 4, 4, 3) and plan.images.dtype == np.uint8
    assert plan.trigger_positions.dtype == np.int64 and plan.decoy_positions.dtype == np.int64
    both = np.concatenate([plan.trigger_positions, plan.decoy_positions])
    assert sorted(both.tolist()) == list(range(10))
    np.testing.assert_array_equal(plan.images[plan.trigger_positions], triggers)
    np.testing.assert_array_equal(plan.images[plan.decoy_positions], decoys)


def test_plan_is_seeded():
    triggers = _images(list(range(0, 80, 10)))
    decoys = _images(list(range(100, 180, 10)))
    a = plan_queries(triggers, decoys, seed=7)
    b = plan_queries(triggers, decoys, seed=7)
    c = plan_queries(triggers, decoys, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.trigger_positions, b.trigger_positions)
    assert not np.array_equal(a.trigger_positions, c.trigger_positions)


def test_plan_allows_unequal_counts_and_no_decoys():
    plan = plan_queries(_images([1, 2, 3]), _images([4]), seed=0)
    assert len(plan.images) == 4 and len(plan.decoy_positions) == 1
    plan = plan_queries(_images([1, 2]), _images([]), seed=0)
    assert sorted(plan.trigger_positions.tolist()) == [0, 1]
    assert plan.decoy_positions.shape == (0,)


def test_plan_rejects_bad_inputs():
    with pytest.raises(TicketctlError, match="empty"):
        plan_queries(_images([]), _images([1]), seed=0)
    with pytest.raises(TicketctlError, match=r"\(4, 4, 3\).*\(5, 5, 3\)"):
        plan_queries(_images([1]), _images([2], shape=(5, 5, 3)), seed=0)
    with pytest.raises(TicketctlError, match="uint8"):
        plan_queries(_images([1]).astype(np.float32), _images([2]), seed=0)
    with pytest.raises(TicketctlError, match="4-d"):
        plan_queries(np.zeros((4, 4, 3), dtype=np.uint8), _images([2]), seed=0)


def test_split_answers_unshuffles():
    plan = plan_queries(_images([0, 30, 60]), _images([90, 120]), seed=1)
    labels = [_label(img) for img in plan.images]
    t, d = split_answers(labels, plan)
    assert t.tolist() == [0, 1, 2] and d.tolist() == [3, 4]
    with pytest.raises(TicketctlError, match="2 answers for a plan of 5"):
        split_answers(labels[:2], plan)


# --- run_predict_cmd --------------------------------------------------------------------------


def test_round_trip_through_model_script(tmp_path: Path):
    workdir = tmp_path / "work dir with spaces"
    workdir.mkdir()
    record = tmp_path / "argv.txt"
    cmd = _script(tmp_path, "model.py", MODEL_SCRIPT.format(record=str(record)))
    triggers = _images([v * 26 + 5 for v in range(5)])  # labels 0..4
    decoys = _images([v * 26 + 5 for v in range(5, 10)])  # labels 5..9
    plan = plan_queries(triggers, decoys, seed=11)

    labels = run_predict_cmd(cmd, plan.images, timeout=30, workdir=workdir)

    assert labels == [_label(img) for img in plan.images]
    t, d = split_answers(labels, plan)
    assert t.tolist() == [_label(img) for img in triggers] == [0, 1, 2, 3, 4]
    assert d.tolist() == [_label(img) for img in decoys] == [5, 6, 7, 8, 9]
    query_file = Path(record.read_text())
    assert query_file.parent == workdir and query_file.suffix == ".npz"
    assert not query_file.exists()


def test_nonzero_exit_reports_last_stderr_line(tmp_path: Path):
    cmd, record = _recorder(
        tmp_path, "sys.stderr.write('loading\\nservice unavailable: quota exceeded\\n')\n"
        "sys.exit(3)\n"
    )
    with pytest.raises(TicketctlError) as err:
        run_predict_cmd(cmd, _images([1, 2]), workdir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "helper.py" in msg
    assert "status 3" in msg and "service unavailable: quota exceeded" in msg
    assert "loading" not in msg
    assert not Path(record.read_text()).exists()


def test_timeout_kills_process_group(tmp_path: Path):
    """A command that outlives its timeout is killed with every process it started. The
    stand-in is a shell script (it starts in milliseconds, so it has written its pids long
    before the 5 s timeout, even on a loaded machine) that sleeps 600 s in a child process:
    returning well before that shows the timeout cut it short."""
    pid_file, record = tmp_path / "pids", tmp_path / "argv"
    script = tmp_path / "helper.sh"
    script.write_text(f'echo "$1" > {shlex.quote(str(record))}\n'
                      "sleep 600 &\n"
                      f"echo $$ $! > {shlex.quote(str(pid_file))}\n"
                      "wait\n")
    cmd = f"sh {shlex.quote(str(script))}"
    start = time.monotonic()
    with pytest.raises(TicketctlError, match=r"within 5 seconds") as err:
        run_predict_cmd(cmd, _images([1]), timeout=5.0, workdir=tmp_path)
    assert time.monotonic() - start < 600
    assert "helper.sh" in str(err.value) and "\n" not in str(err.value)
    pid, child_pid = (int(x) for x in pid_file.read_text().split())
    assert _gone(pid, wait=60) and _gone(child_pid, wait=60)
    assert not Path(record.read_text().strip()).exists()


@pytest.mark.parametrize(
    "output, pattern",
    [
        ("hello there", r"printed 'hello there', not JSON"),
        ("", r"printed 'nothing', not JSON"),
        ('{"labels": [1, 2]}', r"JSON dict, not a list"),
        ("[1, 2, 3]", r"printed 3 labels, expected 2"),
        ("[1]", r"printed 1 labels, expected 2"),
        ("[0.9, 0.1]", r"0\.9 at position 0, not an integer"),
        ('[1, "cat"]', r"'cat' at position 1, not an integer"),
        ("[true, false]", r"True at position 0, not an integer"),
    ],
)
def test_bad_output_is_rejected(tmp_path: Path, output: str, pattern: str):
    cmd, record = _recorder(tmp_path, f"print({output!r})\n")
    with pytest.raises(TicketctlError, match=pattern) as err:
        run_predict_cmd(cmd, _images([1, 2]), workdir=tmp_path)
    assert "helper.py" in str(err.value) and "\n" not in str(err.value)
    assert not Path(record.read_text()).exists()


def test_missing_command_and_bad_workdir(tmp_path: Path):
    with pytest.raises(TicketctlError, match=r"status 127"):
        run_predict_cmd("ticketctl-no-such-predictor-xyz", _images([1]), workdir=tmp_path)
    with pytest.raises(TicketctlError, match="does not exist"):
        run_predict_cmd("true", _images([1]), workdir=tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


def test_output_is_bounded(tmp_path: Path):
    """A command that prints without end is stopped at a few kB, not read into memory."""
    start = time.monotonic()
    with pytest.raises(TicketctlError, match="printed more than") as err:
        run_predict_cmd("yes", _images([1, 2]), timeout=600, workdir=tmp_path)
    assert time.monotonic() - start < 600  # stopped for its output, not by the timeout
    assert "\n" not in str(err.value)


def test_a_child_left_behind_neither_delays_nor_survives(tmp_path: Path):
    """The command answers and exits, leaving a child that holds its stdout open: the answer
    counts (no timeout), and the child is ended with the command's group."""
    pid_file = tmp_path / "child"
    script = tmp_path / "answer.sh"
    script.write_text(f"sleep 600 &\necho $! > {shlex.quote(str(pid_file))}\necho '[3]'\n")
    labels = run_predict_cmd(f"sh {shlex.quote(str(script))}", _images([1]), timeout=300,
                             workdir=tmp_path)
    assert labels == [3]
    assert _gone(int(pid_file.read_text()), wait=60)
