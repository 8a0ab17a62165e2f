"""Resume state (urae_lite/train/resume.py): publishing checkpoints atomically, finding them, reading them back,
the RNG states a resumed run restores, and exact resume as shipped (NF4 base, bf16 autocast, Prodigy or 8-bit
AdamW), every optimizer-state tensor compared. Exactness after a kill in a fresh process is in test_train_loop.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_utils import (  # noqa: F401
    REPO,
    RESOLUTION,
    assert_same_tree,
    make_dataset,
    one_thread,
    recipe_overrides,
    tree_leaves,
)

from urae_lite.errors import UraeError
from urae_lite.safetensors_io import atomic_save_file
from urae_lite.train.cache import build_cache
from urae_lite.train.config import load_recipe
from urae_lite.train.loop import train
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


# --- exact resume as shipped -------------------------------------------------------------------------------------

RECIPE_2K = REPO / "recipes" / "train_2k_lora.yaml"
#: bitsandbytes keeps tensors under `min_8bit_size` (default 4096 values) in fp32 states. The tiny model's factors
#: hold 16 x 32 = 512 values where FLUX's hold 16 x 3072, so without this override the tiny run would be plain
#: 32-bit AdamW and the 8-bit states (uint8 codes, quantile maps, block absmax) a GPU run keeps would go untested.
ADAMW8BIT = "{_component_: bitsandbytes.optim.AdamW8bit, lr: 1.0e-3, min_8bit_size: 0}"
#: the per-parameter state entries each optimizer keeps (bitsandbytes nests its quantization state in a sub-dict)
STATE_KEYS = {
    "prodigy": {"step", "s", "p0", "exp_avg", "exp_avg_sq"},
    "adamw8bit": {"step", "__bnb_optimizer_quant_state__"},
}
QUANT_KEYS = {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
STEPS, EVERY, STOP = 4, 2, 4  # checkpoints at 2 and 4; the interrupted run stops as step 4 begins (3 done)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny_flux):
    """Three items (square, landscape, portrait buckets) cached for the tiny model."""
    folder = make_dataset(tmp_path_factory.mktemp("resume") / "data", sizes=[(64, 64), (80, 48), (48, 80)])
    build_cache(folder, str(tiny_flux), RESOLUTION, max_sequence_length=32, progress=False)
    return folder


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _checkpoint(run: Path, step: int) -> Path:
    return checkpoint_root(run) / f"step-{step:08d}"


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw8bit"])
def test_resume_is_exact_on_the_shipped_nf4_bf16_setup(tiny_flux, small_data, tmp_path, optimizer):
    """The recipe as shipped (NF4 base, bf16 autocast, activations checkpointed to the CPU) with Prodigy and with 8-bit
    AdamW: a run interrupted as step 4 begins and resumed from its step-2 checkpoint ends bit-identical to one that
    never stopped: every optimizer-state tensor of every factor, the schedule, the factors, the adapter, the losses."""
    extra = {"training.steps": STEPS, "checkpoint.every": EVERY, "checkpoint.keep": 5}
    if optimizer == "adamw8bit":
        extra["optimizer"] = ADAMW8BIT
    else:
        extra["optimizer.d0"] = 1e-3  # Prodigy's initial step estimate: large enough for the factors to move
    runs = {name: recipe_overrides(tiny_flux, small_data, tmp_path / name, **extra) for name in ("straight", "resumed")}
    cfg = load_recipe(RECIPE_2K, runs["straight"])
    assert (cfg.memory.quant, cfg.training.precision, cfg.memory.checkpointing) == ("nf4", "bf16", "cpu")  # as shipped
    train(cfg, progress=False)

    def stop(step: int) -> None:
        if step == STOP:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(load_recipe(RECIPE_2K, runs["resumed"]), progress=False, on_step=stop)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000002"]
    assert len(_losses(tmp_path / "resumed")) == STOP - 1  # step 3 ran and is run again after the resume
    train(load_recipe(RECIPE_2K, runs["resumed"]), resume="auto", progress=False)

    straight, resumed = _checkpoint(tmp_path / "straight", STEPS), _checkpoint(tmp_path / "resumed", STEPS)
    opt_a = torch.load(straight / "optimizer.pt", weights_only=False)
    opt_b = torch.load(resumed / "optimizer.pt", weights_only=False)
    state = opt_a["optimizer"]["state"]
    assert len(state) == 2 * 14  # A and B of the authors' 14 targets of the tiny model, each with its state
    assert all(set(entries) == STATE_KEYS[optimizer] for entries in state.values())
    if optimizer == "adamw8bit":  # the 8-bit path ran: uint8 codes with their maps and block scales
        for entries in state.values():
            quant = entries["__bnb_optimizer_quant_state__"]
            assert set(quant) == QUANT_KEYS and quant["state1"].dtype == quant["state2"].dtype == torch.uint8
    # the state moved after the checkpoint the run resumed from, in every factor: the comparison below has teeth
    earlier = torch.load(_checkpoint(tmp_path / "straight", EVERY) / "optimizer.pt", weights_only=False)
    earlier = earlier["optimizer"]["state"]
    for i, entries in state.items():
        changed = [
            path
            for (path, x), (_, y) in zip(tree_leaves(entries), tree_leaves(earlier[i]))
            if isinstance(x, torch.Tensor) and not torch.equal(x, y)
        ]
        assert changed, i
    tensors = assert_same_tree(opt_a, opt_b)  # optimizer state and param groups, schedule: everything, bit for bit
    assert tensors >= len(state) * (4 if optimizer == "prodigy" else 6)
    for name in ("trainable.safetensors", "adapter.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (
        _losses(tmp_path / "resumed") == _losses(tmp_path / "straight") and len(_losses(tmp_path / "straight")) == STEPS
    )
    for name in ("adapter.safetensors",):  # the final export after the loop, too
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
