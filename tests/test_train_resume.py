"""Resume state (urae_lite/train/resume.py): publishing checkpoints atomically, finding them, reading them back,
and the RNG states a resumed run restores. End-to-end exactness after a kill is in test_train_loop.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from urae_lite.errors import UraeError
from urae_lite.safetensors_io import atomic_save_file
from urae_lite.train.resume import (
    checkpoint_root,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    partial_dir,
    publish,
    rng_state,
    set_rng_state,
    write_rng,
)


def _save(out, step: int, keep: int = 10, value: float = 0.0):
    """What the training loop does: stage the per-rank and model files, then publish."""
    staging = partial_dir(out, step)
    staging.mkdir(parents=True)
    write_rng(staging, 0)
    atomic_save_file({"w": torch.full((2, 3), value)}, staging / "trainable.safetensors")
    optimizer = {"optimizer": {"state": {0: {"step": torch.tensor(float(step))}}}, "scheduler": {"last_epoch": step}}
    return publish(staging, out, step, optimizer, {"step": step, "items": ["a", "b"]}, keep)


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_publish_renames_the_staging_folder_and_keeps_the_last_n(tmp_path):
    for step in (5, 10, 15):
        final = _save(tmp_path, step, keep=2)
        assert final == checkpoint_root(tmp_path) / f"step-{step:08d}"
        assert sorted(p.name for p in final.iterdir()) == [
            "optimizer.pt",
            "rng-0.pt",
            "state.json",
            "trainable.safetensors",
        ]
        assert not partial_dir(tmp_path, step).exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000015"]


def test_publishing_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 5, value=1.0)
    _save(tmp_path, 5, value=2.0)  # a resumed run that re-reaches step 5
    assert len(list_checkpoints(tmp_path)) == 1
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[0], 0)["trainable"]["w"], torch.full((2, 3), 2.0))


def test_only_complete_checkpoints_are_listed_in_step_order(tmp_path):
    assert list_checkpoints(tmp_path) == []  # no checkpoints folder yet
    for step in (100, 20):
        _save(tmp_path, step)
    root = checkpoint_root(tmp_path)
    (root / "step-00000300").mkdir()  # no state.json: killed before it was complete
    partial_dir(tmp_path, 400).mkdir()  # a staging folder
    (root / "step-500").mkdir()  # not our name
    (root / "step-00000600.txt").write_text("")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000100"]  # numeric order


def test_find_checkpoint_latest_or_a_path_else_one_line_errors(tmp_path):
    with pytest.raises(UraeError, match="--resume: no checkpoint in .*; start without --resume"):
        find_checkpoint(tmp_path, "auto")
    first, second = _save(tmp_path, 5), _save(tmp_path, 9)
    assert find_checkpoint(tmp_path, "auto") == find_checkpoint(tmp_path, "latest") == second
    assert find_checkpoint(tmp_path, str(first)) == first
    with pytest.raises(UraeError, match="not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path))


def test_load_checkpoint_returns_what_was_saved(tmp_path):
    torch.manual_seed(3)
    final = _save(tmp_path, 7, value=0.5)
    ckpt = load_checkpoint(final, 0)
    assert ckpt["state"] == {"step": 7, "items": ["a", "b"]}
    assert torch.equal(ckpt["trainable"]["w"], torch.full((2, 3), 0.5))
    assert ckpt["optimizer"]["scheduler"] == {"last_epoch": 7}
    assert torch.equal(ckpt["optimizer"]["optimizer"]["state"][0]["step"], torch.tensor(7.0))
    assert torch.equal(ckpt["rng"]["torch"], torch.get_rng_state())
    assert load_checkpoint(final, 1)["rng"] is None  # a rank that saved nothing (e.g. more processes now)


def test_an_unreadable_checkpoint_is_one_line_with_advice(tmp_path):
    final = _save(tmp_path, 7)
    (final / "state.json").write_text("{truncated")
    with pytest.raises(UraeError, match="is unreadable .*resume from an older one with --resume PATH"):
        load_checkpoint(final, 0)


def test_rng_state_round_trip_restores_every_generator():
    saved = rng_state()
    first = _draws()
    assert _draws() != first
    set_rng_state(saved)
    assert _draws() == first
