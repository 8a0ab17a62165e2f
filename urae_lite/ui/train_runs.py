"""Training runs started from the page: `urae-lite train` (or `cache`) in a subprocess with the argument list the
CLI would get, steered the way a user steers it in a terminal (SIGINT = Ctrl+C, the safe stop; `SAMPLE_NOW` in the
run folder = one validation now), and watched from the files the run writes (no Gradio here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UraeError
from ..safetensors_io import atomic_write_text
from .paths import Folders

BOOKKEEPING = ".urae_ui"  # in the runs folder: each run's command (for Resume) and console output
SAMPLE_NOW = "SAMPLE_NOW"  # the training loop runs one validation when this file appears in output_dir
PAGE_KEYS = ("model", "output_dir", "data.dir")  # set by the page's own fields, not by overrides
PATH_KEYS = ("transformer", "base_pipeline", "vae", "clip", "t5", "data.cache")  # must stay inside the folders
TAIL = 12  # log.jsonl lines shown
SHIPPED = ("train_2k_lora", "train_4k_minor")  # the recipes shipped with urae-lite, offered by name


@dataclass
class Started:
    name: str  # the run folder relative to the runs folder
    argv: list[str]  # after `urae-lite`
    pid: int
    console: Path
    process: subprocess.Popen | None = None  # None: started by an earlier server (its exit code is not known here)


def _key(run: Path, folders: Folders) -> str:
    return str(run.relative_to(folders.runs))


def _default_sigint() -> None:
    """In the child before exec: Ctrl+C's default back (a server started with `nohup` or `&` ignores SIGINT, and
    an ignored signal stays ignored across exec, so the page's Stop would never reach the training loop)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(record: dict) -> bool:
    """The recorded process still runs and is that very `urae-lite` command (not a reused pid, not a zombie)."""
    import psutil

    try:
        process = psutil.Process(int(record["pid"]))
        if abs(process.create_time() - float(record["created"])) > 1 or process.status() == psutil.STATUS_ZOMBIE:
            return False
        command = process.cmdline()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
    argv = [str(a) for a in record["argv"]]
    return "urae_lite.cli" in command and command[-len(argv) :] == argv


class TrainRuns:
    """The subprocesses started from the page, by run folder. Each one's pid is recorded in the runs folder's
    bookkeeping, so a restarted server still sees (and can stop) the runs an earlier one started."""

    def __init__(self, folders: Folders):
        self.folders = folders
        self.book = folders.runs / BOOKKEEPING
        self.children: dict[str, subprocess.Popen] = {}  # the processes this server started (their exit codes)

    def _stem(self, name: str) -> str:
        return name.replace(os.sep, "__")

    def _record(self, name: str) -> dict | None:
        try:
            return json.loads((self.book / f"{self._stem(name)}.pid.json").read_text())
        except (OSError, ValueError):
            return None

    def _started(self, name: str) -> Started | None:
        """The recorded process for a run folder name (running or not), or None when the page never started one."""
        record = self._record(name)
        if record is None:
            return None
        child = self.children.get(name)
        if child is not None and child.pid == record.get("pid"):
            child.poll()  # reaps it when it has ended (no zombie)
        else:
            child = None
        return Started(name, record["argv"], record["pid"], self.book / f"{self._stem(name)}.log", child)

    def _live(self, name: str) -> Started | None:
        s = self._started(name)
        return s if s is not None and _alive(self._record(name) or {}) else None

    def names(self) -> list[str]:
        """The run folders the page started a process for (by this server or an earlier one)."""
        records = (self._record(p.name.removesuffix(".pid.json")) for p in self.book.glob("*.pid.json"))
        return sorted(r["name"] for r in records if r and "name" in r)

    # ---- commands ----------------------------------------------------------------------------------------------
    def train_argv(
        self, recipe: str, dataset: str, run: str, model: str, overrides: Sequence[str] = ()
    ) -> tuple[list[str], Path]:
        """`train RECIPE data.dir=... output_dir=... model=... OVERRIDES`, every path checked."""
        from ..presets import RECIPES

        # a shipped recipe by its name; any other recipe is a file the user put in the runs folder
        recipe_path = RECIPES / f"{recipe}.yaml" if recipe in SHIPPED else self.folders.inside(recipe, "runs")
        data = self.folders.inside(dataset, "datasets")
        out = self.folders.inside(run, "runs")
        if out == self.folders.runs:
            raise UraeError("choose a run folder inside the runs folder (e.g. my-run)")
        argv = ["train", str(recipe_path), f"data.dir={data}", f"output_dir={out}", f"model={model}"]
        for line in overrides:
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UraeError(f"override {line!r} is not key=value (e.g. training.steps=500)")
            if key in PAGE_KEYS:
                raise UraeError(f"{key} is set by the page's own field: remove the {key}= override")
            if key in PATH_KEYS and value.strip() not in ("", "null"):
                value = str(self.folders.inside(value.strip()))
            argv.append(f"{key}={value.strip()}")
        return argv, out

    def cache_argv(self, dataset: str, model: str, resolution: int) -> list[str]:
        data = self.folders.inside(dataset, "datasets")
        return ["cache", str(data), "--model", model, "--resolution", str(int(resolution))]

    # ---- processes ---------------------------------------------------------------------------------------------
    def start(self, argv: list[str], run: Path) -> Started:
        """Run `urae-lite ARGV` for the run folder `run`; its console output goes to the page's bookkeeping."""
        import psutil

        name = _key(run, self.folders)
        if self.running(run):
            raise UraeError(f"run {name} is already running: stop it first")
        self.book.mkdir(exist_ok=True)
        stem = self._stem(name)
        console = self.book / f"{stem}.log"
        if argv[0] == "train":
            atomic_write_text(self.book / f"{stem}.json", json.dumps({"argv": argv}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(console, "ab") as log:
            # a session of its own: Ctrl+C on the page's server does not reach the run (it keeps going; stop it here)
            process = subprocess.Popen(
                [sys.executable, "-m", "urae_lite.cli", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        try:
            created = psutil.Process(process.pid).create_time()
        except psutil.Error:  # already gone: nothing left to track
            created = 0.0
        record = {"name": name, "pid": process.pid, "created": created, "argv": argv}
        atomic_write_text(self.book / f"{stem}.pid.json", json.dumps(record))
        self.children[name] = process
        return Started(name, argv, process.pid, console, process)

    def running(self, run: Path) -> bool:
        return self._live(_key(run, self.folders)) is not None

    def active(self) -> str | None:
        """Why the device is taken: a run started from the page (by this server or an earlier one), or None."""
        for name in self.names():
            if self._live(name) is not None:
                return f"training run {name} (started from this page) is using the device: stop it or wait for it"
        return None

    def stop(self, run: Path) -> str:
        """The safe stop: SIGINT, as Ctrl+C in the run's terminal."""
        s = self._live(_key(run, self.folders))
        if s is None:
            raise UraeError(f"no run started from this page is running in {run.name}: nothing to stop")
        os.kill(s.pid, signal.SIGINT)
        return f"sent the safe stop (SIGINT) to run {s.name} (pid {s.pid})"

    def sample_now(self, run: Path) -> str:
        if not run.is_dir():
            raise UraeError(f"{run} is not a run folder yet: start the run first")
        (run / SAMPLE_NOW).touch()
        return f"asked run {run.name} for validation samples now ({SAMPLE_NOW})"

    def resume_argv(self, run: Path) -> list[str]:
        """The command the run was started with (this page's record, else the run's config.yaml) plus `--resume`."""
        record = self.book / f"{self._stem(_key(run, self.folders))}.json"
        if record.is_file():
            argv = json.loads(record.read_text())["argv"]
        elif (run / "config.yaml").is_file():
            argv = ["train", str(run / "config.yaml")]
        else:
            raise UraeError(f"{run} holds no run to resume (no config.yaml): start it first")
        return [a for a in argv if a != "--resume"] + ["--resume"]

    # ---- watching ----------------------------------------------------------------------------------------------
    def status(self, run: Path) -> str:
        name = _key(run, self.folders)
        s = self._started(name)
        if s is None:
            return "not started from this page"
        if self._live(name) is not None:
            return f"running (pid {s.pid})"
        code = None if s.process is None else s.process.poll()
        return f"ended with exit code {code}" if code is not None else "ended (started by an earlier server)"

    def exit_code(self, run: Path) -> int | None:
        s = self._started(_key(run, self.folders))
        return None if s is None or s.process is None else s.process.poll()

    def console_tail(self, run: Path, lines: int = TAIL) -> str:
        console = self.book / f"{self._stem(_key(run, self.folders))}.log"
        if not console.is_file():
            return ""
        return "\n".join(_last_lines(console.read_text(errors="replace"), lines))


def _last_lines(text: str, n: int) -> list[str]:
    # tqdm redraws with carriage returns: keep the last state of each line
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()][-n:]


def read_log(run: Path) -> list[dict]:
    """log.jsonl's records (a line being written is skipped)."""
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def total_steps(run: Path) -> int | None:
    """training.steps of the run (its config.yaml, written when it starts)."""
    try:
        return int(yaml.safe_load((run / "config.yaml").read_text())["training"]["steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def eta_seconds(records: list[dict], steps: int | None, window: int = 20) -> float | None:
    """Seconds left: the steps still to run times the mean `seconds` (one step's time) of the last `window`
    records. Validation and checkpoints are not in it: the ETA is the training steps' own."""
    if not records or steps is None:
        return None
    recent = [r for r in records if "seconds" in r and "step" in r][-window:]
    if not recent:
        return None
    per_step = sum(r["seconds"] for r in recent) / len(recent)
    return max(steps - int(records[-1]["step"]), 0) * per_step


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA: unknown until the first steps are logged"
    left = time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 3600:.0f} h"
    return f"ETA: {left}"
