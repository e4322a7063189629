"""examples.quickstart: every stage has a heading and its own time, then the table and what next."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # renders and evaluates TinyBEVDet: about 20 s of CPU even at this size
def test_quickstart_shows_each_stage_the_table_and_what_next(tmp_path):
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, "-m", "examples.quickstart", "--scenes", "8", "--finetune-steps", "1", "--html", "r.html"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    headings = re.findall(r"^\[(\d)/4\] (\S+)", out, re.M)
    assert headings == [("1", "Quantize"), ("2", "Fine-tune"), ("3", "Evaluate"), ("4", "Write")]
    elapsed = [float(v) for v in re.findall(r"^ +done in (\d+\.\d) s$", out, re.M)]
    total = float(re.search(r"^total (\d+) s wall", out, re.M).group(1))
    assert len(elapsed) == 4 and sum(elapsed) <= total + 1  # each stage's own time, not time since start
    rows = re.findall(r"^(FP32|W4A8 PTQ|W4A8 PTQAT \(1 steps\)) +(\d\.\d{3}) +(\d\.\d{3})$", out, re.M)
    assert [name for name, _, _ in rows] == ["FP32", "W4A8 PTQ", "W4A8 PTQAT (1 steps)"]
    assert "small-discrepancy half by accumulated relative error" in (tmp_path / "r.html").read_text()
    for hint in ("open the report:        r.html", "python -m examples.bev.ablation", "ptqat-fx analyze"):
        assert hint in out
