"""Output destinations are checked before any work starts; a final write that fails lands in a fallback file."""

from __future__ import annotations

import errno

import pytest
from PIL import Image

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


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("urae-lite: error:"), err
    return err[0]


def test_every_writing_command_checks_before_working(tmp_path, a_file, capsys):
    """The model does not exist either: the destination error comes first, so no work was started."""
    bad, model = a_file / "out", "/nonexistent/flux"
    data = tmp_path / "data"
    data.mkdir()
    commands = [
        ["generate", "a fox", "--model", model, "--out", str(bad / "o.png")],
        ["demo", "--out", str(bad / "o.png")],
        ["prepare", "--model", model, "--out", str(bad)],
        ["convert", "a.safetensors", "b.safetensors", "--model", model, "--out", str(bad / "c.safetensors")],
        ["cache", str(data), "--model", model, "--resolution", "64", "--out", str(bad)],
        ["train", "recipes/train_2k_lora.yaml", f"model={model}", f"data.dir={data}", f"output_dir={bad}"],
        ["tiny", "--out", str(bad)],
    ]
    for args in commands:
        assert main(args) == 2, args
        line = _one_error_line(capsys)
        assert f"{a_file} is a file, not a folder" in line, (args, line)


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
