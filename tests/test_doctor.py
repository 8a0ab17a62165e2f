"""`urae-lite doctor` on the CPU: the kernels checked in Triton's interpreter (which doctor switches on itself), the
2-block model with the kernels on and off, the JSON report, and a non-zero exit when a kernel is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
cpu_run = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run; a GPU run takes minutes")


@cpu_run
def test_doctor_on_the_cpu_writes_its_report_and_passes(tmp_path):
    """As a user runs it: a fresh process without TRITON_INTERPRET (doctor must set it before the kernels load)."""
    report_file = tmp_path / "doctor.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "URAE_LITE_KERNELS")}
    env["URAE_LITE_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "urae_lite.cli", "doctor", "--json", str(report_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout
    report = json.loads(report_file.read_text())
    assert report["ok"] is True and report["failures"] == []
    env_info = report["environment"]
    assert env_info["device"] == "cpu" and env_info["ram_total_gib"] > 0
    assert set(env_info["versions"]) >= {"torch", "triton", "bitsandbytes", "optimum-quanto", "diffusers", "urae-lite"}
    assert report["kernels"]["mode"] == "auto" and report["kernels"]["interpreter"] is True
    assert "off on the CPU" in report["kernels"]["why"]

    checks = report["checks"]
    assert {(c["op"], c["dtype"]) for c in checks} == {
        (op, dt)
        for op in ("nf4_dequantize", "fp8_dequantize", "lowrank_forward", "lowrank_backward")
        for dt in ("bfloat16", "float16", "float32")
    }
    assert all(c["ok"] and c["error"] <= c["bound"] and c["message"] == "" for c in checks)
    assert any("FLUX shapes" in note for note in report["skipped"])

    (e2e,) = report["end_to_end"]
    assert e2e["ok"] is True and e2e["quant"] == "nf4"
    assert e2e["output_error"] <= e2e["output_bound"] and e2e["grad_error"] <= e2e["grad_bound"]
    assert 0 < e2e["output_error"]  # the two paths really differ (the kernels ran)
    assert report["advice"] == [] and "no GPU to plan for" in proc.stdout
    assert not (tmp_path / "cache").exists()  # the CPU has no self-check verdicts to rewrite


@cpu_run
def test_doctor_exits_non_zero_when_a_kernel_is_wrong(tmp_path, monkeypatch, capsys):
    """The fused GEMM 1% off: its checks fail in every dtype and doctor exits with 2, naming them. (The model run,
    20 s in the interpreter and the previous test's, is replaced by a passing result: the op checks decide here.)"""
    from urae_lite import cli, doctor
    from urae_lite.kernels import interpreting, lowrank_gemm

    if not interpreting():
        pytest.skip("urae_lite.kernels was imported before TRITON_INTERPRET=1 was set")
    real = lowrank_gemm._launch_gemm

    def wrong(*args):
        real(*args)
        args[-1].mul_(1.01)

    monkeypatch.setattr(lowrank_gemm, "_launch_gemm", wrong)
    monkeypatch.setattr(doctor, "end_to_end", lambda device, quant, full: {"quant": quant, "ok": True, "message": ""})
    monkeypatch.setenv("URAE_LITE_CACHE", str(tmp_path / "cache"))
    report_file = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--json", str(report_file)]) == 2
    err = capsys.readouterr().err
    assert "check(s) failed" in err and "lowrank_forward bfloat16 37x70x50x40" in err and "bug report" in err
    report = json.loads(report_file.read_text())
    assert report["ok"] is False
    failed = {(c["op"], c["dtype"]) for c in report["checks"] if not c["ok"]}
    assert failed == {
        (op, dt) for op in ("lowrank_forward", "lowrank_backward") for dt in ("bfloat16", "float16", "float32")
    }
    assert len(report["failures"]) == 6


def test_doctor_switches_the_interpreter_on_before_the_kernels_load(monkeypatch):
    """No GPU: TRITON_INTERPRET=1 is set if the kernels are not imported yet, else doctor starts again with it."""
    import argparse

    from urae_lite import doctor

    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "urae_lite.kernels", raising=False)
    assert not doctor._needs_reexec(cpu) and os.environ["TRITON_INTERPRET"] == "1"

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setitem(sys.modules, "urae_lite.kernels", sys.modules.get("urae_lite.kernels", object()))
    assert doctor._needs_reexec(cpu) and "TRITON_INTERPRET" not in os.environ
    assert not doctor._needs_reexec(torch.device("cuda", 0))  # compiled kernels on a GPU

    calls = []
    monkeypatch.setattr(doctor.subprocess, "call", lambda argv, env: calls.append((argv, env)) or 3)
    with pytest.raises(SystemExit) as stop:
        doctor._reexec(argparse.Namespace(json="r.json", device=None))
    assert stop.value.code == 3
    argv, env = calls[0]
    assert argv[1:] == ["-m", "urae_lite.cli", "doctor", "--json", "r.json"] and env["TRITON_INTERPRET"] == "1"


def test_planner_advice_for_a_card_and_its_ram(monkeypatch):
    from urae_lite import doctor

    monkeypatch.setattr(doctor, "TASKS", (("generate", 2048), ("train", 4096)))
    generate, train = doctor.planner_advice(24, 48)
    assert generate["settings"].startswith("--quant ") and train["settings"].startswith("memory.quant=")
    assert generate["peak_gib"] <= 24 and train["peak_gib"] <= 24 and train["host_gib"] <= 48
    monkeypatch.setattr(doctor, "TASKS", (("generate", 2048),))
    (tiny,) = doctor.planner_advice(0.5, 48)
    assert tiny["settings"] is None and tiny["message"].startswith("nothing fits in 0.5 GiB")
