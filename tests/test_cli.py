"""The command line: prepare and convert work end to end; mistakes end in one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from synthetic_adapters import write_authors_2k, write_authors_4k

from urae_lite.adapter_io import read_adapter
from urae_lite.cli import main
from urae_lite.loader import load_transformer
from urae_lite.quant import QUANT_FORMATS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "urae_lite.cli", *args], capture_output=True, text=True, timeout=300)


def _error_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.startswith("urae-lite: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_prepare_and_convert_from_the_command_line(tiny_flux, tiny_config, tmp_path, capsys):
    assert main(["prepare", "--model", str(tiny_flux), "--quant", "fp8", "--out", str(tmp_path / "q")]) == 0
    assert "peak rss" in capsys.readouterr().out
    model = load_transformer(tmp_path / "q", quant="fp8", progress=False)
    assert model.get_submodule("transformer_blocks.0.attn.to_q").base.weight.dtype == torch.float8_e4m3fn
    f2 = write_authors_2k(tmp_path / "a2k.safetensors", tiny_config)
    f4 = write_authors_4k(tmp_path / "a4k.safetensors", tiny_config)
    out = tmp_path / "a4k_lora.safetensors"
    assert main(["convert", str(f2), str(f4), "--model", str(tiny_flux), "--out", str(out)]) == 0
    assert read_adapter(out).ranks == {12}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["prepare", "--model", "/nonexistent/flux", "--out", "x"], "model not found: /nonexistent/flux"),
        (
            ["convert", "a.safetensors", "b.safetensors", "--model", "tiny", "--out", "c"],
            "file not found: a.safetensors",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(args, needle, tmp_path):
    proc = _run(*args)
    assert proc.returncode == 2
    assert needle in _error_line(proc.stderr)


def test_unknown_quant_is_rejected_with_the_valid_values():
    proc = _run("prepare", "--model", "tiny", "--quant", "int3", "--out", "x")
    assert proc.returncode == 2 and f"unknown quantization 'int3': use one of {', '.join(QUANT_FORMATS)}" in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _run("prepare", "--model", "/nonexistent/flux", "--out", str(tmp_path / "x"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UraeError" in proc.stderr


def test_key_value_overrides_are_accepted_after_options(tmp_path, capsys):
    """argparse gives `overrides` only the words before the first option; those after it are the same overrides
    (each one below is wrong on purpose: its error shows it was read), and other stray words stay errors."""
    from train_utils import REPO

    recipe = str(REPO / "recipes" / "train_2k_lora.yaml")
    train = ["train", recipe, f"data.dir={tmp_path}", "--format", "kohya", f"output_dir={tmp_path / 'o'}"]
    assert main([*train, "validation.size=100"]) == 2
    assert "validation.size 100 is not" in capsys.readouterr().err
    assert main(["cache", str(tmp_path), "--check", "--resolution", "64", "data.min_side=-1"]) == 2
    assert "data.min_side must be 0 or more" in capsys.readouterr().err
    for stray in ("--nope", "nope"):
        with pytest.raises(SystemExit) as exit_code:
            main(["cache", str(tmp_path), "--check", "--resolution", "64", "data.min_side=1", stray])
        assert exit_code.value.code == 2 and f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`urae-lite cache DIR --check | head`: the reader has gone (here: the pipe's read end is closed before the
    command starts, so its first write fails by construction), and the command stops without a traceback."""
    import os

    from train_utils import make_dataset

    data = make_dataset(tmp_path / "data", sizes=[(64, 64)])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "urae_lite.cli", "cache", str(data), "--check", "--resolution", "64"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == ""
