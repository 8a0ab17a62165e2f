"""RunReport: stage timings (also for a stage that fails), the printed table, and the memory peaks."""

from __future__ import annotations

import resource

import psutil
import pytest
import torch

from urae_lite import report as report_module
from urae_lite.report import GiB, RunReport, peak_rss_bytes


class _Clock:
    """perf_counter that advances by the given steps, one per call."""

    def __init__(self, *steps: float):
        self.now, self.steps = 100.0, list(steps)

    def __call__(self) -> float:
        self.now += self.steps.pop(0) if self.steps else 0.0
        return self.now


def test_stages_are_timed_in_order_even_when_one_fails(monkeypatch):
    monkeypatch.setattr(report_module.time, "perf_counter", _Clock(0.0, 1.25, 0.0, 0.5))
    report = RunReport()
    with report.stage("text encoders"):
        pass
    with pytest.raises(RuntimeError, match="boom"), report.stage("denoise"):
        raise RuntimeError("boom")  # the error passes through, and the stage still counts
    assert report.stages == [("text encoders", 1.25), ("denoise", 0.5)]
    assert report.as_dict()["stages_s"] == {"text encoders": 1.25, "denoise": 0.5}


def test_format_lists_stages_total_and_memory(monkeypatch):
    monkeypatch.setattr(report_module, "peak_rss_bytes", lambda: 3 * GiB // 2)
    report = RunReport([("text encoders", 1.234), ("vae decode", 10.0)])
    lines = report.format().splitlines()
    assert lines[0].split() == ["stage", "seconds"]
    assert lines[1].split() == ["text", "encoders", "1.23"] and lines[2].split() == ["vae", "decode", "10.00"]
    assert lines[3].split() == ["total", "11.23"]
    assert "peak rss: 1.50 GiB" in lines
    assert len({len(line) for line in lines[:4]}) == 1  # names padded to one width, seconds right-aligned


def test_as_dict_rounds_to_milliseconds():
    assert RunReport([("load", 0.123456)]).as_dict()["stages_s"] == {"load": 0.123}


def test_peak_rss_is_bytes_and_at_least_the_current_rss():
    current = psutil.Process().memory_info().rss
    peak = peak_rss_bytes()
    later = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; peaks only grow
    assert 0.9 * current <= peak <= later  # the kernel's counters lag a little behind /proc's current RSS


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_initialized(), reason="CPU-only process")
def test_memory_without_cuda_reports_only_host_rss(monkeypatch):
    monkeypatch.setattr(report_module, "peak_rss_bytes", lambda: 2 * GiB)
    assert RunReport().memory() == {"peak_rss_gib": 2.0}
