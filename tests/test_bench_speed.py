"""benchmarks/train_speed.py on CPU: the rows it adds for the batch-128 question (NCHW
against channels_last) run, and `--profile` says where a step's time goes."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parent.parent


def test_train_speed_profiles_a_row(tmp_path):
    out = tmp_path / "speed.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_speed.py"), "--smoke",
                          "--configs", "c,c-nchw", "--profile", "c-nchw", "--no-round2",
                          "--json-out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"c", "c-nchw"} and not any("error" in r for r in rows.values())
    assert rows["c-nchw"]["flags"]["channels_last"] is False
    assert rows["c"]["flags"]["channels_last"] is True
    assert "profile" not in rows["c"]  # only the rows named in --profile
    prof = rows["c-nchw"]["profile"]
    assert prof["steps"] == rows["c-nchw"]["steps_per_epoch"] > 0
    assert prof["kernels_seen"] is False  # CPU: operators, not kernels
    top = prof["top"]
    assert 0 < len(top) <= 25
    # sorted by time, shares of one total; ResNet-20's step spends its time in convolutions
    assert [t["us_per_step"] for t in top] == sorted((t["us_per_step"] for t in top),
                                                     reverse=True)
    assert 0 < sum(t["share"] for t in top) <= 1 + 1e-9
    assert any("conv" in t["name"] for t in top[:3])
    assert prof["device_ms_per_step"] * 1000 >= top[0]["us_per_step"]
