"""`bench/gpu_check.py --dry-run`: the GPU machine's one command runs every step on the CPU, so CI knows it starts,
walks every section, and writes its table and JSON (the real run needs a lent GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_dry_run_walks_every_section_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["dry_run"] is True and payload["environment"]["torch"]
    sections = {row["section"] for row in payload["rows"]}
    assert sections == {"torch engine", "commands", "train", "engines", "throughput"}
    assert not [row for row in payload["rows"] if row["status"] == "fail"], payload["rows"]
    assert {row["check"] for row in payload["rows"] if row["section"] == "train"} >= {"torchrun 1 process (gloo)"}
    assert "rows in" in done.stdout and "section" in done.stdout  # the table


def test_budget_spent_means_skipped_steps_not_a_crash(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    check = gpu_check.Check(dry_run=True, minutes=0.0, work=tmp_path)
    ran = []
    check.step("train", lambda: ran.append(1), needs_seconds=60)
    assert not ran and check.rows[0]["status"] == "skip" and "time budget" in check.rows[0]["detail"]
    check = gpu_check.Check(dry_run=True, minutes=5.0, work=tmp_path)
    check.step("engines", lambda: 1 / 0, needs_seconds=1)
    assert check.rows[0]["status"] == "fail" and "ZeroDivisionError" in check.rows[0]["detail"]
