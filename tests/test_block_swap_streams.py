"""Block swap's stream path on the CPU, through a stand-in for CudaStreams (urae_lite/block_swap.py `Streams`).

The stand-in runs the window's CUDA code path on CPU tensors and logs every allocation (with the stream whose pool
it comes from), copy, wait, event and free. From that log:

* the window is bounded: the device copies a caching allocator would hold (live copies, plus freed ones it may not
  reuse yet because `record_stream` tied them to another stream, which with the CPU running ahead of the GPU is
  never) are at most two blocks' worth; copies come from the compute stream's pool, the side stream waits for the
  compute stream before it copies, no `record_stream`, and a prefetch's copies are freed only after the compute
  stream waited for its copy event (an unused prefetch too);
* the prefetch follows the order blocks are entered in, checkpoint segments included: a training step makes no
  copy on the compute stream (every entered block was resident or prefetched) and wastes no prefetch, with
  `checkpoint_every` 1, 2 and 3, and its loss and gradients are those of the model without swap.
"""

from __future__ import annotations

import copy
import itertools
import weakref

import pytest
import torch
from conftest import transformer_inputs
from train_utils import one_thread  # noqa: F401  (tiny models: one intra-op thread)

from urae_lite.block_swap import backward_entries, enable_block_swap, execution_blocks
from urae_lite.loader import LoadSpec, adapted_layers, empty_transformer, fill_transformer
from urae_lite.tiny import iter_random_transformer_tensors
from urae_lite.train.checkpoint_segments import enable_checkpoint_segments

CPU = torch.device("cpu")


class _Stream:
    def __init__(self, name: str, streams: RecordingStreams):
        self.name, self.streams = name, streams

    def wait_stream(self, stream: _Stream) -> None:
        self.streams.log.append(("wait_stream", self.name, stream.name))

    def wait_event(self, event: _Event) -> None:
        self.streams.log.append(("wait_event", self.name, event))
        self.streams.waited[self.name].add(event)


class _Event:
    def __init__(self, serial: int, stream: str):
        self.serial, self.stream = serial, stream

    def __repr__(self) -> str:
        return f"event{self.serial}@{self.stream}"


class RecordingStreams:
    """CudaStreams' operations on CPU tensors, logged, with the bytes a caching allocator would hold."""

    def __init__(self):
        self.log: list[tuple] = []
        self.compute, self._side = _Stream("compute", self), _Stream("side", self)
        self.waited: dict[str, set] = {"compute": set(), "side": set()}
        self.live: dict[int, int] = {}  # serial -> bytes of each copy alive
        self.stuck: dict[int, int] = {}  # freed after record_stream: not reusable until the GPU catches up
        self.peak = 0  # the most bytes live + stuck at once
        self.record_streams = 0
        self.unwaited_frees: list[int] = []  # copies freed before the compute stream waited for their copy
        self._serials, self._events = itertools.count(), itertools.count()
        self._serial_of: dict[int, int] = {}  # id(tensor) -> serial, while it lives
        self._source: dict[int, int] = {}  # serial -> id of the host tensor copied into it
        self._event_of: dict[int, _Event] = {}  # serial -> the event recorded after its copy on the side stream
        self.event_sources: dict[_Event, list[int]] = {}  # event -> ids of the host tensors copied before it
        self._unevented: list[int] = []
        self._recorded: set[int] = set()

    # the Streams protocol
    def current(self) -> _Stream:
        return self.compute

    def side(self) -> _Stream:
        return self._side

    def empty(self, like: torch.Tensor, stream: _Stream) -> torch.Tensor:
        t = torch.empty(like.shape, dtype=like.dtype)
        serial = next(self._serials)
        self._serial_of[id(t)] = serial
        self.live[serial] = t.numel() * t.element_size()
        self.log.append(("alloc", stream.name, serial))
        weakref.finalize(t, self._free, serial, id(t))
        self.peak = max(self.peak, sum(self.live.values()) + sum(self.stuck.values()))
        return t

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: _Stream) -> None:
        dst.copy_(src)
        serial = self._serial_of[id(dst)]
        self._source[serial] = id(src)
        self.log.append(("copy", stream.name, serial))
        if stream.name != "compute":
            self._unevented.append(serial)

    def event(self, stream: _Stream) -> _Event:
        event = _Event(next(self._events), stream.name)
        self.log.append(("record", stream.name, event))
        for serial in self._unevented:
            self._event_of[serial] = event
        self.event_sources[event] = [self._source[s] for s in self._unevented]
        self._unevented = []
        return event

    # what the allocator sees
    def record_stream(self, t: torch.Tensor, stream) -> None:
        self.record_streams += 1
        self._recorded.add(self._serial_of[id(t)])

    def _free(self, serial: int, key: int) -> None:
        self._serial_of.pop(key, None)
        nbytes = self.live.pop(serial)
        self.log.append(("free", serial))
        event = self._event_of.get(serial)
        if event is not None and event not in self.waited["compute"]:
            self.unwaited_frees.append(serial)
        if serial in self._recorded:
            self.stuck[serial] = nbytes

    def copies_on(self, stream: str, since: int = 0) -> list[int]:
        """Host tensor ids copied on `stream`, log entries from `since` on."""
        return [self._source[e[2]] for e in self.log[since:] if e[0] == "copy" and e[1] == stream]


def _model(config: dict, every: int) -> torch.nn.Module:
    """A trainable tiny FLUX (bf16 base, fp32 compute, a LoRA with non-zero B) with block checkpointing in segments
    of `every`."""
    model = fill_transformer(
        empty_transformer(config),
        iter_random_transformer_tensors(config, seed=0),
        LoadSpec("bf16", CPU, torch.float32, progress=False),
    )
    g = torch.Generator().manual_seed(3)
    for _, layer in adapted_layers(model):
        lora = layer.add_lora("lora", 2, generator=g, dtype=torch.float32)
        torch.nn.init.normal_(lora.B, std=0.1, generator=g)
    model.enable_gradient_checkpointing()
    enable_checkpoint_segments(model, every)
    return model.train()


@pytest.fixture(scope="module")
def nine_blocks(tiny_config) -> dict:
    """3 double + 6 single blocks: with 8 swapped, one resident block shares the first segment with swapped ones,
    and segments of 2 and 3 cross the double -> single junction."""
    return {**tiny_config, "num_layers": 3, "num_single_layers": 6}


@pytest.fixture
def streams(monkeypatch) -> RecordingStreams:
    rec = RecordingStreams()
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: rec.record_stream(t, s))
    return rec


def _step(model, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = model(**inputs, return_dict=False)[0].square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _window_bound(swap) -> tuple[int, int]:
    """(largest block, two largest blocks) of device copy bytes."""
    sizes = sorted(sum(h.numel() * h.element_size() for h in b.host) for b in swap.blocks)
    return sizes[-1], sizes[-1] + sizes[-2]


def test_prefetch_copies_are_bounded_to_the_window(nine_blocks, streams):
    model = _model(nine_blocks, 1)
    inputs = transformer_inputs(nine_blocks, dtype=torch.float32)
    swap = enable_block_swap(model, 8, CPU, streams=streams)
    one, window = _window_bound(swap)
    with torch.no_grad():  # two denoising-like passes: the second starts on the block the first prefetched
        model(**inputs, return_dict=False), model(**inputs, return_dict=False)
    _step(model, inputs), _step(model, inputs)

    log = streams.log
    assert streams.record_streams == 0
    assert {e[1] for e in log if e[0] == "alloc"} == {"compute"}  # copies come from the compute stream's pool
    assert one < streams.peak <= window  # prefetches overlapped a running block, never more than the window
    assert not streams.unwaited_frees
    # each prefetch: its copies allocated, the side stream waits for the compute stream, copies, an event
    side = [i for i, e in enumerate(log) if e[0] == "copy" and e[1] == "side"]
    assert side
    for i in side:
        wait = max((j for j in range(i) if log[j][0] == "wait_stream"), default=None)
        alloc = next(j for j, e in enumerate(log) if e[0] == "alloc" and e[2] == log[i][2])
        assert wait is not None and log[wait] == ("wait_stream", "side", "compute") and alloc < wait
        assert all(e[0] == "copy" and e[1] == "side" for e in log[wait + 1 : i + 1])

    # an unused prefetch released (as moving the transformer off the device does): the compute stream waits for
    # its copy event first, then its copies are freed
    with torch.no_grad():
        model(**inputs, return_dict=False)  # its last block prefetches the first for the next pass
    pending = [b for b in swap.blocks if b.prefetched]
    assert len(pending) == 1 and pending[0] is swap.blocks[0]
    event, n_copies = pending[0].ready, len(pending[0].host)
    del pending
    start = len(log)
    swap.release_all()
    assert log[start] == ("wait_event", "compute", event)
    freed = [streams._event_of.get(e[1]) for e in log[start + 1 : start + 1 + n_copies] if e[0] == "free"]
    assert freed == [event] * n_copies  # then its copies are freed (the running block's follow, no wait needed)
    assert [e[0] for e in log[start + 1 :]].count("wait_event") == 0
    assert not streams.unwaited_frees and streams.peak <= window


@pytest.mark.parametrize("every", [1, 2, 3])
def test_training_step_fetches_nothing_in_stream_and_wastes_no_prefetch(nine_blocks, streams, every):
    """8 of 9 blocks swapped. From the second step on, a step's entries are all served by the window (the first
    step's first block has nothing before it to prefetch it); the blocks follow `backward_entries`."""
    reference = _model(nine_blocks, every)
    model = copy.deepcopy(reference)
    inputs = transformer_inputs(nine_blocks, dtype=torch.float32)
    swap = enable_block_swap(model, 8, CPU, streams=streams)
    block_of = {id(b.host[0]): pos for pos, b in enumerate(swap.blocks)}  # a block's first tensor stands for it
    entered: list[tuple[int, bool, bool]] = []
    wasted: list[int] = []

    def entering(pos: int) -> None:  # runs before the swap's own hook
        entered.append((pos, torch.is_grad_enabled(), torch._C._current_graph_task_id() != -1))

    def waited(event) -> None:  # a prefetch's event waited for while another block is entered: released unused
        block = block_of[streams.event_sources[event][0]]
        if block != entered[-1][0]:
            wasted.append(block)

    for pos, b in enumerate(swap.blocks):
        b.module.register_forward_pre_hook(lambda _m, _a, pos=pos: entering(pos), prepend=True)
    compute_wait = streams.compute.wait_event
    streams.compute.wait_event = lambda event: (waited(event), compute_wait(event))

    counts = []
    for _ in range(2):
        start, entered[:] = len(streams.log), []
        loss, grads = _step(model, inputs)
        ref_loss, ref_grads = _step(reference, inputs)
        assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        in_stream = [block_of[s] for s in streams.copies_on("compute", start) if s in block_of]
        prefetched = [block_of[s] for s in streams.copies_on("side", start) if s in block_of]
        counts.append((in_stream, prefetched, list(wasted)))
        wasted.clear()
    swapped_from = len(execution_blocks(model)) - 8
    expected = [(p, True, False) for p in range(8)] + [
        (g - swapped_from, mode == "recompute", True) for g, mode in backward_entries(9, every) if g >= swapped_from
    ]
    assert entered == expected  # the order the prediction follows
    (first, _, first_wasted), (in_stream, prefetched, step_wasted) = counts
    assert first == [0] and not first_wasted  # the very first entry: nothing ran before it
    assert in_stream == [] and step_wasted == [] and prefetched
