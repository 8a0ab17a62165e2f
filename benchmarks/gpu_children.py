"""How benchmarks/gpu_check.py runs one slice's process: output in files, a timeout, and nothing left behind.

Each child leads its own process group, and when it ends (exit, timeout, or gpu_check stopped by a signal) the
whole group is killed: compile workers, pytest's workers and anything else it started must not outlive the slice
and skew the next one's time and memory. The group is killed while the child is still unreaped (a zombie at worst),
so its id cannot have been reused by an unrelated process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 30
POLL_S = 0.05


@dataclass
class ChildResult:
    rc: int | None  # None: killed at its timeout
    wall_s: float
    stdout: str
    stderr: str

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join((self.stdout + "\n" + self.stderr).strip().splitlines()[-n:])

    def last_line(self) -> str:
        return ((self.stderr or self.stdout).strip().splitlines() or ["no output"])[-1][:300]


def child_argv(target: str, args: list[str]) -> list[str]:
    """The command line of a fresh child: `target` is "pytest" or a script path."""
    return [sys.executable, *(["-m", "pytest"] if target == "pytest" else [target]), *args]


def child_env(dry_run: bool, interpret: bool = False) -> dict:
    """GPU children never interpret Triton (benchmarks/kernel_bench.py refuses to); the dry run's kernel tests must."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_child(work: Path, target: str, args: list[str], env: dict, timeout_s: float, fork: bool = False) -> ChildResult:
    """Run `target args` (a script, or "pytest") in its own process group with stdout/stderr in files under `work`
    (no pipe to fill), killed with everything it started at `timeout_s`. A fresh interpreter has its own CUDA
    context, allocator and peak counters. `fork` runs it in a fork of this process instead, which has done the slow
    imports already (the dry run: the CPU has no counters to keep apart, and those imports cost ~30 s per child on
    a small machine)."""
    out, err = work / "stdout.txt", work / "stderr.txt"
    start = time.monotonic()
    if fork:
        rc = _run_forked([target, *args], env, timeout_s, out, err)
    else:
        with out.open("w") as fo, err.open("w") as fe:
            proc = subprocess.Popen(
                child_argv(target, args), cwd=ROOT, env=env, stdout=fo, stderr=fe, start_new_session=True
            )
            try:
                exited = wait_for(proc.pid, timeout_s)
            finally:  # also when gpu_check is stopped while waiting: the group goes with it
                kill_group(proc.pid)
                code = proc.wait()
            rc = code if exited else None
    return ChildResult(rc, time.monotonic() - start, out.read_text(errors="replace"), err.read_text(errors="replace"))


def wait_for(pid: int, timeout_s: float) -> bool:
    """Whether child `pid` exited within `timeout_s`; it is left unreaped, so its pid, the id of its process group,
    stays taken until `kill_group` has run."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group (none left: nothing to do)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_here(argv: list[str]) -> None:
    """What `python SCRIPT ARGS` or `python -m pytest ARGS` does, in this (forked) process."""
    if argv[0] == "pytest":
        import pytest

        raise SystemExit(pytest.main(argv[1:]))
    import runpy

    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).parent))
    runpy.run_path(argv[0], run_name="__main__")


def _run_forked(argv: list[str], env: dict, timeout_s: float, out: Path, err: Path) -> int | None:
    """run_here(argv) in a forked child that leads its own process group; its exit code, or None when killed at
    the timeout."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's loop
        code = 1
        try:
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.environ.clear()
            os.environ.update(env)
            os.chdir(ROOT)
            run_here(argv)
            code = 0
        except SystemExit as e:  # as the interpreter would report it
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 -- the child reports anything, as the interpreter would
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # here too: the group exists before anything can be killed, whichever runs first
    except (ProcessLookupError, PermissionError):  # the child got there first, or has already exited
        pass
    try:
        exited = wait_for(pid, timeout_s)
    finally:  # also when gpu_check is stopped while waiting (SIGTERM, Ctrl-C): the group goes with it
        kill_group(pid)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if exited else None
