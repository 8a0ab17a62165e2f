"""Stopping a run cleanly (urae_lite/train/steering.py): Ctrl-C or SIGTERM during step k finishes step k, writes its
checkpoint, exits 0 with the resume command, and `--resume` ends with the adapter of a run that never stopped; a
second Ctrl-C stops at once; the handlers exist only while the loop runs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_utils import REPO, RESOLUTION, make_dataset, one_thread, recipe_overrides  # noqa: F401

from urae_lite.train.cache import build_cache
from urae_lite.train.config import load_recipe
from urae_lite.train.loop import train
from urae_lite.train.resume import list_checkpoints

RECIPE_2K = REPO / "recipes" / "train_2k_lora.yaml"
EXTRA = {"memory.quant": "bf16", "training.precision": "fp32", "training.steps": 4, "optimizer.d0": 1e-3}
STOP = 2  # the signal arrives during step 2


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny_flux):
    folder = make_dataset(tmp_path_factory.mktemp("stop") / "data", sizes=[(64, 64), (80, 48), (48, 80)])
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_flux, small_data):
    """A run that never stopped: its final adapter and losses."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(load_recipe(RECIPE_2K, recipe_overrides(tiny_flux, small_data, out, **EXTRA)), progress=False)
    return out


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _same_adapter(a, b) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigint_finishes_the_step_and_resume_is_exact(tiny_flux, small_data, straight, tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    overrides = recipe_overrides(tiny_flux, small_data, tmp_path / "run", **EXTRA)  # checkpoint.every=0

    def interrupt(step: int) -> None:
        if step == STOP:
            os.kill(os.getpid(), signal.SIGINT)

    train(load_recipe(RECIPE_2K, overrides), progress=False, on_step=interrupt)  # returns: no KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [f"step-{STOP:08d}"]  # written though every=0
    assert not (tmp_path / "run" / "adapter.safetensors").exists()  # no final export: the run is not finished
    printed = capsys.readouterr().out
    assert f"stopped by SIGINT after step {STOP} of 4" in printed and "continue with: " in printed
    assert _losses(tmp_path / "run") == _losses(straight)[:STOP]

    train(load_recipe(RECIPE_2K, overrides), resume="auto", progress=False)
    _same_adapter(straight, tmp_path / "run")
    assert _losses(tmp_path / "run") == _losses(straight)


def test_a_second_sigint_stops_at_once(tiny_flux, small_data, tmp_path):
    before = signal.getsignal(signal.SIGINT)

    def interrupt_twice(step: int) -> None:
        if step == STOP:
            signal.raise_signal(signal.SIGINT)  # the handler runs before raise_signal returns
            signal.raise_signal(signal.SIGINT)

    cfg = load_recipe(RECIPE_2K, recipe_overrides(tiny_flux, small_data, tmp_path / "run", **EXTRA))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=interrupt_twice)
    assert signal.getsignal(signal.SIGINT) is before
    assert list_checkpoints(tmp_path / "run") == [] and len(_losses(tmp_path / "run")) == STOP - 1  # step 2 undone


def test_sigterm_to_the_command_exits_0_and_its_printed_command_resumes(tiny_flux, small_data, straight, tmp_path):
    """`urae-lite train` in a fresh process gets SIGTERM during step 2: exit status 0, a checkpoint at 2, and the
    command it prints (run here) finishes with the adapter of the run that never stopped."""
    overrides = recipe_overrides(tiny_flux, small_data, tmp_path / "run", **EXTRA)
    script = (
        "import os, signal, sys\n"
        "from urae_lite.train import loop\n"
        "step = loop.Trainer.step\n"
        "def stepped(self, samples, indices, where, *a):\n"
        f"    if where == 'training step {STOP}': os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return step(self, samples, indices, where, *a)\n"
        "loop.Trainer.step = stepped\n"
        "from urae_lite.cli import main\n"
        f"sys.exit(main(['train', {str(RECIPE_2K)!r}, *{overrides!r}]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SIGTERM: finishing this step" in result.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [f"step-{STOP:08d}"]
    line = next(x for x in result.stdout.splitlines() if x.startswith("continue with: "))
    words = shlex.split(line.removeprefix("continue with: "))
    assert words[:3] == ["urae-lite", "train", str(RECIPE_2K)] and words[-1] == "--resume"
    from urae_lite.cli import main

    assert main(words[1:]) == 0
    _same_adapter(straight, tmp_path / "run")


def test_a_stop_on_a_validation_step_skips_the_validation(tiny_flux, small_data, tmp_path, capsys):
    """Ctrl-C during a step after which validation is due (validation.every, and SAMPLE_NOW): the checkpoint is
    written and the run stops as usual, without first sampling the validation images."""
    validation = {
        "validation.every": STOP,
        "validation.prompts": ["a cat"],
        "validation.size": 48,
        "validation.steps": 2,
    }
    overrides = recipe_overrides(tiny_flux, small_data, tmp_path / "run", **EXTRA, **validation)

    def interrupt(step: int) -> None:
        if step == STOP:
            (tmp_path / "run" / "SAMPLE_NOW").touch()
            os.kill(os.getpid(), signal.SIGINT)

    train(load_recipe(RECIPE_2K, overrides), progress=False, on_step=interrupt)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [f"step-{STOP:08d}"]
    assert f"stopped by SIGINT after step {STOP} of 4" in capsys.readouterr().out
    assert list((tmp_path / "run").glob("validation/step-*")) == []  # validation/ holds the prompts' embeddings
    assert (tmp_path / "run" / "SAMPLE_NOW").exists()  # the request is left for the resumed run
