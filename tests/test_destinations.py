"""Output destinations are checked before any work starts; a final write that fails lands in a fallback file.

Every writing command (generate, demo, prepare, convert, cache, train, export, tiny) is run through the CLI against
every failure `urae_lite.destinations` handles: a parent that is a file, a file destination that is a folder or a
folder destination that is a file, no permission (simulated through `os.access`, and for real as an unprivileged
user), a parent that cannot be entered, a full disk; and for `train` an output_dir that holds checkpoints (without
--resume) or none (with it). Each must end in one `urae-lite: error:` line with exit code 2 before any input is
opened (on Linux, inotify watches the model, data and adapter files) and without writing anything anywhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import struct
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from synthetic_adapters import write_authors_2k, write_authors_4k
from train_utils import REPO, make_dataset

from urae_lite import destinations
from urae_lite.cli import main
from urae_lite.destinations import check_output_dir, check_output_file, write_with_fallback
from urae_lite.errors import UraeError


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "taken.png"
    path.write_bytes(b"not a folder")
    return path


def test_file_destinations(tmp_path, a_file):
    assert check_output_file(tmp_path / "new" / "deeper" / "x.png") == tmp_path / "new" / "deeper" / "x.png"
    assert check_output_file(a_file) == a_file  # replacing a file is fine
    with pytest.raises(UraeError, match=f"{a_file} is a file, not a folder"):
        check_output_file(a_file / "o.png")
    with pytest.raises(UraeError, match=f"--out {tmp_path} is a folder"):
        check_output_file(tmp_path)


def test_folder_destinations(tmp_path, a_file):
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    with pytest.raises(UraeError, match=f"output_dir {a_file} is a file, not a folder"):
        check_output_dir(a_file, "output_dir")
    with pytest.raises(UraeError, match=f"{a_file} is a file, not a folder"):
        check_output_dir(a_file / "sub" / "run")


def test_a_full_disk_is_refused(tmp_path, monkeypatch):
    class Usage:
        free = 2**20

    monkeypatch.setattr(destinations.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(UraeError, match="is full .1 MiB free"):
        check_output_file(tmp_path / "x.png")


def test_failed_final_write_goes_to_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(destinations.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    wanted = tmp_path / "wanted.txt"

    def write(path):
        if path == wanted:
            raise OSError(errno.ENOSPC, "No space left on device")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("result")
        return path

    with pytest.raises(UraeError, match=r"No space left on device\); it was saved to .*wanted.txt instead") as e:
        write_with_fallback(wanted, write, "result")
    saved = next((tmp_path / "tmp" / "urae-lite-unsaved").iterdir())
    assert saved.read_text() == "result" and str(saved) in str(e.value)
    assert not wanted.exists()


class Opened:
    """Which files and folders under some folders are opened (read, listed) from now on, seen by the kernel (Linux
    inotify), so reads by native code (safetensors, tokenizers) count as well as Python's."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, roots: list[Path]):
        self.folders: dict[int, Path] = {}
        self.libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC) if self.libc is not None else -1
        self.available = self.fd >= 0  # elsewhere the other checks still run, this one reports nothing
        if not self.available:
            return
        for root in roots:
            for folder in (root, *(p for p in root.rglob("*") if p.is_dir())):
                wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_ACCESS | self.IN_OPEN)
                assert wd >= 0, (folder, os.strerror(ctypes.get_errno()))
                self.folders[wd] = folder
        self.paths()  # the listing above opened the folders: start clean

    def paths(self) -> set[Path]:
        """What was opened since the last call."""
        seen = set()
        while self.available:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return seen
            i = 0
            while i < len(buf):
                wd, _, _, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16 : i + 16 + n].rstrip(b"\0").decode()
                folder = self.folders.get(wd, Path("<inotify queue overflow: reads were lost>"))
                seen.add(folder / name if name else folder)
                i += 16 + n
        return seen

    def close(self) -> None:
        if self.available:
            os.close(self.fd)


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size and modification time: what a write would change."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            found[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_flux, tiny_config):
    """Valid inputs for every writing command, so that only the destination can stop it."""
    root = tmp_path_factory.mktemp("inputs")
    return SimpleNamespace(
        recipe=REPO / "recipes" / "train_2k_lora.yaml",  # read before the check: not watched
        root=root,
        model=tiny_flux,
        data=make_dataset(root / "data", sizes=[(64, 64)]),
        a2k=write_authors_2k(root / "a2k.safetensors", tiny_config),
        a4k=write_authors_4k(root / "a4k.safetensors", tiny_config),
    )


def writing_commands(inp) -> dict[str, tuple[str, str, object]]:
    """name -> (destination kind, option name in messages, argv for a destination)."""
    m, data = str(inp.model), str(inp.data)
    generate = ["generate", "a fox", "--model", m, "--width", "64", "--height", "64", "--steps", "1", "--device", "cpu"]
    train = [
        "train",
        str(inp.recipe),
        f"model={m}",
        f"data.dir={data}",
        "data.resolution=64",
        "device=cpu",
        "training.steps=1",
    ]
    return {
        "generate": ("file", "--out", lambda d: [*generate, "--out", d]),
        "generate --vram": ("file", "--out", lambda d: [*generate, "--vram", "24", "--out", d]),
        "demo": ("file", "--out", lambda d: ["demo", "--size", "64", "--steps", "1", "--out", d]),
        "convert": ("file", "--out", lambda d: ["convert", str(inp.a2k), str(inp.a4k), "--model", m, "--out", d]),
        "export": ("file", "--out", lambda d: ["export", str(inp.a2k), "--out", d]),
        "prepare": ("dir", "--out", lambda d: ["prepare", "--model", m, "--out", d]),
        "cache": ("dir", "--out", lambda d: ["cache", data, "--model", m, "--resolution", "64", "--out", d]),
        "train": ("dir", "output_dir", lambda d: [*train, f"output_dir={d}"]),
        "train --vram": ("dir", "output_dir", lambda d: [*train, f"output_dir={d}", "--vram", "24"]),
        "tiny": ("dir", "--out", lambda d: ["tiny", "--out", d]),
    }


def _name(kind: str) -> str:
    return "o.png" if kind == "file" else "out"


@pytest.fixture
def refused(inputs, tmp_path, monkeypatch, capsys):
    """Run a command that must be refused: returns its one error line after checking that it opened no input and
    wrote nothing (not in the work folder, the inputs, the fallback folder or the tiny-model cache)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(destinations.tempfile, "gettempdir", lambda: str(work / "tmp"))
    monkeypatch.setenv("URAE_LITE_CACHE", str(work / "cache"))  # where `demo` and `--model tiny` build the model
    opened = Opened([inputs.root, inputs.model])

    def run(argv: list[str]) -> str:
        before = (_tree(work), _tree(inputs.root), _tree(inputs.model))
        capsys.readouterr()
        opened.paths()  # forget the listing `_tree` just did
        code = main(argv)
        read = opened.paths()
        out, err = capsys.readouterr()
        assert code == 2, (argv, code, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("urae-lite: error:") and not out, (argv, out, err)
        assert read == set(), argv  # no model, data or adapter was read: no work started
        assert (_tree(work), _tree(inputs.root), _tree(inputs.model)) == before, argv  # nothing written
        return lines[0]

    run.work = work
    yield run
    opened.close()


def test_the_watch_sees_what_a_command_reads(inputs, tmp_path):
    """Control for the 'no input opened' checks below: a command that works is seen reading its input."""
    opened = Opened([inputs.root])
    if not opened.available:
        pytest.skip("no inotify on this system")
    try:
        assert main(["export", str(inputs.a2k), "--out", str(tmp_path / "k.safetensors")]) == 0
        assert inputs.a2k in opened.paths()
    finally:
        opened.close()


def test_a_parent_that_is_a_file(inputs, refused):
    blocker = refused.work / "taken"
    blocker.write_bytes(b"a file where a folder is needed")
    for name, (kind, _, argv) in writing_commands(inputs).items():
        line = refused(argv(str(blocker / "sub" / _name(kind))))
        assert f"{blocker} is a file, not a folder" in line, (name, line)


def test_a_folder_where_a_file_goes_and_a_file_where_a_folder_goes(inputs, refused):
    folder, file = refused.work / "folder.png", refused.work / "file"
    folder.mkdir()
    (folder / "inside.txt").write_text("kept")
    file.write_bytes(b"kept")
    for name, (kind, option, argv) in writing_commands(inputs).items():
        if kind == "file":
            assert f"{option} {folder} is a folder: give a file name inside it" in refused(argv(str(folder))), name
        else:
            assert f"{option} {file} is a file, not a folder" in refused(argv(str(file))), name


def test_no_permission_or_a_read_only_disk(inputs, refused, monkeypatch):
    """`os.access` is what the check asks (it also says no on a read-only mount); root passes every permission
    test, so the refusal is simulated here, and run for real by an unprivileged process in the next test."""
    locked = refused.work / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        destinations.os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw)
    )
    for name, (kind, option, argv) in writing_commands(inputs).items():
        line = refused(argv(str(locked / "new" / _name(kind))))  # the missing folder would be created in `locked`
        assert f"{option} {locked / 'new' / _name(kind)}: cannot write in {locked} (no permission" in line, name


def test_a_full_disk(inputs, refused, monkeypatch):
    full = refused.work / "full"
    full.mkdir()
    real_usage = shutil.disk_usage

    def usage(path):
        if Path(path) == full:
            return real_usage(path)._replace(free=destinations.MIN_FREE_BYTES - 1)
        return real_usage(path)

    monkeypatch.setattr(destinations.shutil, "disk_usage", usage)
    for name, (kind, _, argv) in writing_commands(inputs).items():
        line = refused(argv(str(full / _name(kind))))
        assert f"the disk holding {full} is full (16 MiB free, 16 MiB needed)" in line, (name, line)


def _unprivileged(argv: list[str]) -> tuple[int, str]:
    """`main(argv)` in a forked process without root's permission bypass (as `nobody` when we are root): exit code
    and everything it printed. The child runs pure Python until the refusal: every import it needs is done here."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import pwd

        code = 99
        try:
            os.close(read)
            sys.stdout = sys.stderr = os.fdopen(write, "w")
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            code = main(argv)
        except BaseException:  # noqa: BLE001 - a traceback is a failure the parent reports
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def test_no_permission_for_real(inputs, tmp_path):
    """A folder the user cannot write in, and one the user cannot even enter (Python 3.11's `Path.is_dir` raises
    there): both are one line naming that folder. As root the check runs in a child process as `nobody`."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no `nobody` user to drop to")
    base = Path(tempfile.mkdtemp(prefix="urae-dest-"))  # under /tmp: `nobody` can reach it
    if os.geteuid() == 0 and not all(os.stat(p).st_mode & stat.S_IXOTH for p in base.parents):
        shutil.rmtree(base)
        pytest.skip(f"the temp folder {base.parent} is not reachable for other users")
    closed = base / "closed"
    closed.mkdir()
    recipe = base / "recipe.yaml"  # `train` reads its recipe first: one the unprivileged user can read
    recipe.write_text(inputs.recipe.read_text())
    recipe.chmod(0o644)
    inputs = SimpleNamespace(**{**vars(inputs), "recipe": recipe})
    try:
        if os.geteuid() == 0:  # owned by root: `nobody` may enter `base` but not write in it, and not enter `closed`
            os.chmod(base, 0o755)
            os.chmod(closed, 0o700)
        else:
            os.chmod(closed, 0o600)  # no search permission for its owner
            os.chmod(base, 0o555)
        commands = writing_commands(inputs)
        blocker = tmp_path / "taken"
        blocker.write_bytes(b"a file")
        for name, (kind, _, argv) in commands.items():  # refused here: imports what the command imports
            assert main(argv(str(blocker / _name(kind)))) == 2, name
        for name, (kind, option, argv) in commands.items():
            for dest, folder in ((base / "new" / _name(kind), base), (closed / "sub" / _name(kind), closed)):
                code, text = _unprivileged(argv(str(dest)))
                lines = text.strip().splitlines()
                assert code == 2 and len(lines) == 1, (name, dest, text[-3000:])
                assert f"urae-lite: error: {option} {dest}: cannot write in {folder} (no permission" in lines[0], name
        os.chmod(base, 0o755)
        os.chmod(closed, 0o755)
        assert sorted(p.name for p in base.rglob("*")) == ["closed", "recipe.yaml"]  # nothing was written
    finally:
        os.chmod(base, 0o755)
        os.chmod(closed, 0o755)
        shutil.rmtree(base)


def test_train_refuses_an_output_dir_with_checkpoints_or_a_resume_without_one(inputs, refused):
    """A finished or running run's folder is not overwritten, and `--resume` needs a checkpoint: both are said
    before the model is resolved (a hub id would be fetched) or loaded."""
    argv = writing_commands(inputs)["train"][2]
    run = refused.work / "run"
    done = run / "checkpoints" / "step-00000001"
    done.mkdir(parents=True)
    (done / "state.json").write_text("{}")
    line = refused(argv(str(run)))
    assert f"{run} already holds checkpoints: pass --resume" in line, line
    empty = refused.work / "empty"
    empty.mkdir()
    assert "--resume: no checkpoint in" in refused([*argv(str(empty)), "--resume"])


def test_the_default_cache_folder_is_checked_too(inputs, refused):
    """`cache` without --out writes DATA/.urae_cache/RESOLUTION."""
    data = refused.work / "data"
    shutil.copytree(inputs.data, data)
    (data / ".urae_cache").write_bytes(b"a file")
    line = refused(["cache", str(data), "--model", str(inputs.model), "--resolution", "64"])
    assert f"{data / '.urae_cache'} is a file, not a folder" in line, line


def test_generate_saves_to_the_fallback_when_the_save_fails(tiny_flux, tmp_path, monkeypatch, capsys):
    from urae_lite.output import GenerationResult

    monkeypatch.setattr(destinations.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    wanted = tmp_path / "fox.png"
    real_save = GenerationResult.save

    def failing_save(self, path):
        if path == wanted:
            raise OSError(errno.EIO, "Input/output error")
        return real_save(self, path)

    monkeypatch.setattr(GenerationResult, "save", failing_save)
    args = [
        "generate",
        "a fox",
        "--model",
        str(tiny_flux),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(wanted),
    ]
    assert main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write the image to" in line and "it was saved to" in line
    saved = next((tmp_path / "tmp" / "urae-lite-unsaved").iterdir())
    assert str(saved) in line and Image.open(saved).size == (64, 64)
    assert Image.open(saved).info["prompt"] == "a fox"
