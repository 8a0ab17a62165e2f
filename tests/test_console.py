"""A command prints only its own progress, results and errors; `--debug` lets the libraries speak again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from synthetic_adapters import write_authors_2k, write_authors_4k
from train_utils import REPO, make_dataset

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
    """A user's environment: offline, none of the libraries' verbosity switches, no Triton interpreter (the suite
    sets it for the kernel tests; a user running on a CPU does not)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS", "TRITON_INTERPRET"):
        env.pop(key, None)
    return env


#: what a command prints on stdout besides the plan table: its result line and the RunReport (urae_lite/report.py)
OUR_STDOUT = re.compile(
    r"wrote .+|cache ready: .+|stage +seconds|\S.* +-?\d+\.\d\d|(peak rss|cuda peak allocated|cuda peak reserved): "
    r"\d+\.\d\d GiB"
)


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


# Every command in a fresh process, the way the `urae-lite` entry point runs it: import `urae_lite.cli`, call main().
# To pay for torch's import once, each command's process is forked from one that has done that import and nothing
# else (everything a command imports after it, diffusers, transformers, bitsandbytes..., is imported in the command's
# own process, after `console.setup`, as in a real run). The two lanes run side by side; within a lane in order
# (train reads the cache `cache` writes, export the adapter `train` writes). The whole interpreter exit runs in each
# child (sys.exit), so a library that prints at shutdown is caught too.
_FORK_EACH = r"""
import json, os, sys, time
lanes = json.loads(sys.argv[1])
import urae_lite.cli

def start(job):
    name, argv, folder = job
    pid = os.fork()
    if pid:
        return pid
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(folder, stream), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["urae-lite", *argv]
    sys.exit(urae_lite.cli.main())

running, codes = {}, {}


def launch(lane):
    job = lane.pop(0)
    running[start(job)] = (lane, job[0], time.perf_counter())


for lane in lanes:
    launch(lane)
while running:
    pid, status, usage = os.wait4(-1, 0)
    lane, name, began = running.pop(pid)
    cpu = usage.ru_utime + usage.ru_stime
    codes[name] = [os.waitstatus_to_exitcode(status), round(time.perf_counter() - began, 1), round(cpu, 1)]
    if lane:
        launch(lane)
print(json.dumps(codes))
"""


def test_every_command_prints_nothing_from_another_library(tiny_flux, tiny_config, tmp_path, capsys):
    """generate, cache, train, prepare, convert, export, plan and demo on the tiny model, each in its own process as a
    user runs it: stderr holds only `urae-lite: ...` lines and our progress bars, stdout only our results and report
    (the plan: exactly the planner's table). Catches a library's warning, log line or print that gets through."""
    model, data = str(tiny_flux), make_dataset(tmp_path / "data", sizes=[(64, 64), (80, 48)])
    a2k = write_authors_2k(tmp_path / "a2k.safetensors", tiny_config)
    a4k = write_authors_4k(tmp_path / "a4k.safetensors", tiny_config)
    recipe = REPO / "recipes" / "train_2k_lora.yaml"  # as shipped: NF4 base, bf16 autocast, Prodigy
    plan = "plan --task train --resolution 512".split()
    jobs = {
        "cache": f"cache {data} --model {model} --resolution 64 --device cpu --max-sequence-length 32".split(),
        "train": f"train {recipe} model={model} data.dir={data} data.resolution=64 output_dir={tmp_path / 'run'} "
        "device=cpu training.steps=1 validation.every=0 checkpoint.every=0".split(),
        "export": f"export {tmp_path / 'run' / 'adapter.safetensors'} --out {tmp_path / 'k.safetensors'}".split(),
        "convert": f"convert {a2k} {a4k} --model {model} --out {tmp_path / '4k.safetensors'}".split(),
        "generate": [
            "generate",
            "a fox",
            *f"--model {model} --width 64 --height 64 --steps 1 --device cpu".split(),
            "--out",
            str(tmp_path / "fox.png"),
        ],
        "prepare": f"prepare --model {model} --out {tmp_path / 'prepared'}".split(),
        "plan": plan,
        "demo": f"demo --size 128 --steps 1 --out {tmp_path / 'demo.png'}".split(),
    }
    lanes = [["cache", "train", "export", "convert", "plan"], ["generate", "demo", "prepare"]]  # ~18 CPU seconds each
    for name in jobs:
        (tmp_path / "io" / name).mkdir(parents=True)
    spec = [[[name, jobs[name], str(tmp_path / "io" / name)] for name in lane] for lane in lanes]
    env = {**_env(), "OMP_NUM_THREADS": "1"}  # two commands at a time on two cores
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_EACH, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]  # importing urae_lite.cli is silent
    runs = json.loads(proc.stdout)  # name -> [exit code, seconds, CPU seconds]
    for name in jobs:
        out = (tmp_path / "io" / name / "stdout").read_text()
        err = (tmp_path / "io" / name / "stderr").read_text()
        assert runs[name][0] == 0, (name, runs, err[-3000:])
        assert _foreign_lines(err) == [], name
        if name == "plan":  # the table, exactly as the planner prints it in this process
            assert out == main_plan_output(plan, capsys), out
        else:
            assert out and [line for line in out.splitlines() if not OUR_STDOUT.fullmatch(line)] == [], (name, out)
    for name, bar in (("generate", "denoising"), ("demo", "denoising"), ("train", "training")):
        assert bar in (tmp_path / "io" / name / "stderr").read_text(), name  # the streams were captured
    assert "peak" in (tmp_path / "io" / "demo" / "stdout").read_text()


def main_plan_output(argv: list[str], capsys) -> str:
    from urae_lite.cli import main

    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out
