"""benchmarks/train.py stays runnable: `--help` on a CPU machine, and its whole path on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from train_utils import REPO

SCRIPT = REPO / "benchmarks" / "train.py"


def test_help_works_without_a_gpu():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--configs" in result.stdout


def test_tiny_smoke_run_writes_a_result(tmp_path):
    out = tmp_path / "train_cpu.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tiny",
            "--configs",
            "4k-nf4",
            "--modes",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu-tiny" and report["command"] and "torch" in report
    (row,) = report["rows"]
    assert (row["config"], row["mode"], row["kind"], row["quant"]) == ("4k-nf4", "cpu", "minor", "nf4")
    assert row["s_per_step"] > 0 and "error" not in row
