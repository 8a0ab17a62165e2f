"""Atomic writes: the finished file appears whole under its name, with the permissions an ordinary write gives."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from urae_lite.safetensors_io import atomic_save_file, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_get_the_umask_mode_and_leave_no_temp_file(tmp_path, umask_022, seed):
    tensors = {"a": torch.randn(3, 5, generator=torch.Generator().manual_seed(seed))}
    saved = atomic_save_file(tensors, tmp_path / "adapter.safetensors", {"k": "v"})
    text = atomic_write_text(tmp_path / "log.json", "{}\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what an ordinary write gets under this umask
    for path in (saved, text):
        assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777 == 0o644, path
    assert torch.equal(load_file(saved)["a"], tensors["a"]) and text.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "log.json", "plain.txt"]


def test_a_failed_save_leaves_neither_file_nor_temp(tmp_path):
    with pytest.raises(Exception):  # noqa: B017  (safetensors raises its own error type for a non-tensor)
        atomic_save_file({"a": "not a tensor"}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
