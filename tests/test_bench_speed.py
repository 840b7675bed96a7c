"""benchmarks/train_speed.py on CPU: the rows it adds for the batch-128 question (NCHW
against channels_last) run, and `--profile` says where a step's time goes."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import HANG_GUARD_S
from torch import nn

from ticketctl.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def _speed(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/train_speed.py"), "--smoke",
                           "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)


def test_train_speed_profiles_a_row(tmp_path):
    out = tmp_path / "speed.json"
    res = _speed("--configs", "c,c-nchw", "--profile", "c-nchw", "--no-round2",
                 "--json-out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"c", "c-nchw"} and not any("error" in r for r in rows.values())
    assert "profile" not in rows["c"]  # only the rows named in --profile
    prof = rows["c-nchw"]["profile"]
    assert prof["steps"] == rows["c-nchw"]["steps_per_epoch"] > 0
    assert prof["unit"] == "operator" and prof["graph_launches"] == 0  # CPU: no graph
    # counts are per step: the convolution's backward runs once per conv layer and step
    convs = sum(isinstance(m, nn.Conv2d) for m in build_model("resnet20").modules())
    backward = [t for t in prof["top"] if t["name"] == "aten::convolution_backward"]
    assert backward and backward[0]["per_step"] == convs
    assert 0 < backward[0]["share"] < 1


def test_train_speed_refuses_a_profile_of_a_row_it_does_not_run(tmp_path):
    res = _speed("--configs", "c", "--profile", "c-nchw")
    assert res.returncode != 0 and "--profile names (c) configs of this run" in res.stderr


def test_train_speed_records_the_inductor_settings_of_a_row(tmp_path):
    """c-coord compiles under Inductor's coordinate-descent tuning for its own row only: each
    row records the settings it ran under, so the row after it shows them restored (on a CPU
    nothing is compiled, but the settings are switched all the same). c-combo is the
    trainer's own --combo-kernels, in its flags."""
    out = tmp_path / "speed.json"
    res = _speed("--configs", "c-coord,c-combo,c-unfused", "--no-round2", "--json-out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert not any("error" in r for r in rows.values())
    assert rows["c-coord"]["inductor"]["coordinate_descent_tuning"] is True
    assert rows["c-combo"]["inductor"]["coordinate_descent_tuning"] is False
    assert rows["c-combo"]["flags"]["combo_kernels"] is True
    assert "combo_kernels" not in rows["c-unfused"]["flags"]
    assert rows["c-unfused"]["flags"]["fuse_step"] is False
