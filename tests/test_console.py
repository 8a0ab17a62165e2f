"""A command prints only its own progress, results and errors; `--debug` lets the libraries speak again."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

#: descriptions of urae-lite's own progress bars (tqdm lines start with them)
OUR_BARS = (
    "loading transformer",
    "loading prepared",
    "quantizing",
    "denoising",
    "SVD per target",
    "training",
    "VAE encode",
    "T5 + CLIP encode",
)


def _foreign_lines(stderr: str) -> list[str]:
    """stderr lines that are neither `urae-lite: ...` messages nor our progress bars (tqdm redraws with \\r)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    return [line for line in lines if not line.startswith("urae-lite: ") and not line.startswith(OUR_BARS)]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(key, None)
    return env


def test_demo_stderr_holds_no_line_from_another_library(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "urae_lite.cli",
            "demo",
            "--size",
            "128",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "demo.png"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _foreign_lines(proc.stderr) == []
    assert "denoising" in proc.stderr and "wrote" in proc.stdout and "peak" in proc.stdout


_SPEAK = """
import logging, sys, warnings
from urae_lite import console
console.setup(debug=sys.argv[1] == "debug")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("library note: a hub kernel is missing")
warnings.warn_explicit("library deprecation", FutureWarning, "modeling_utils.py", 1, module="diffusers.models")
import transformers.utils.logging as tlog
tlog.get_logger("transformers.utils.import_utils").warning("library fallback note")
logging.getLogger("urae_lite.train").warning("our own warning")
"""


@pytest.mark.parametrize("mode", ["quiet", "debug"])
def test_library_output_is_silenced_unless_debug(mode):
    proc = subprocess.run([sys.executable, "-c", _SPEAK, mode], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "urae-lite: our own warning" in proc.stderr
    library = ("library note", "library deprecation", "library fallback note")
    if mode == "quiet":
        assert _foreign_lines(proc.stderr) == []
        assert not any(text in proc.stderr for text in library)
    else:
        assert all(text in proc.stderr for text in library), proc.stderr
        assert "urae-lite: library note" not in proc.stderr  # a library's line never wears our prefix


def test_cli_debug_flag_reaches_the_console_setup(monkeypatch):
    from urae_lite import cli, console

    calls = []
    monkeypatch.setattr(console, "setup", lambda debug=False: calls.append(debug))
    assert cli.main(["plan", "--task", "generate", "--debug"]) == 0
    assert cli.main(["plan", "--task", "generate"]) == 0
    assert calls == [True, False]
