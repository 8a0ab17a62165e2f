"""The planner against the real code at FULL FLUX.1-dev size, without a GPU: fake tensors + live storage bytes.

One configuration (generate 1024², NF4 base, rank-16 adapter, `model` offload, one denoising step through the
kernels' custom ops) runs end to end under FakeTensorMode in well under a minute; benchmarks/memory.py --fake runs
the whole matrix (benchmarks/results/memory_fake.json), tests/test_plan_measured.py the goal plans and every shipped
profile. Band: every phase within ±5% of the planner's allocated
bytes (text encoding, denoising and the plain VAE decode measured 1.000, 0.999 and 1.001 when written). The exact
tiled decode's working set is checked against vae_memory.py at the two sizes where its two terms set the peak, and
the harness's CUDA emulation (measure/fake_cuda.py) against what CPU autocast alone would allocate.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from plan_utils import plan_config

from urae_lite.measure.fake import (
    GENERATE_PHASES,
    HOST,
    LiveBytes,
    fake_from_config,
    fake_mode,
    fake_pipeline,
    fake_vae,
    forget_fake_workspaces,
    measure,
    measure_generate,
    module_tensors,
    text_encoder_configs,
)
from urae_lite.measure.fake_cuda import cuda_autocast_policy
from urae_lite.memory import MemorySettings
from urae_lite.plan import estimate
from urae_lite.vae_memory import tiled_working_bytes

BAND = 0.05


@pytest.fixture
def kernels_on(monkeypatch):
    """The fused path a GPU runs: AdaptedLinear -> urae_lite.kernels -> torch.ops.urae_lite (fake impls)."""
    import urae_lite.kernels  # noqa: F401  (registers the custom ops)

    if not hasattr(torch.ops.urae_lite, "lowrank_forward"):
        pytest.skip("torch.ops.urae_lite custom ops are not registered")
    monkeypatch.setenv("URAE_LITE_KERNELS", "on")
    yield
    forget_fake_workspaces()


def test_generate_1024_nf4_full_size_matches_planner(kernels_on, capsys):
    with fake_mode():
        pipe = fake_pipeline(MemorySettings(quant="nf4", vae_tiling="off"), rank=16)
        phases = measure_generate(pipe, 1024)
    est = estimate(
        plan_config(task="generate", width=1024, height=1024, quant="nf4", offload="model", rank=16, vae_tiling="off")
    )
    planned = dict(zip(est.phases, est.allocated()))
    assert [p.name for p in phases] == list(GENERATE_PHASES)
    ratios = {}
    for p in phases:
        assert p.peak > 0
        assert p.name in planned, f"measured phase {p.name!r} has no planner phase ({', '.join(planned)})"
        ratios[p.name] = p.peak / planned[p.name]
    with capsys.disabled():
        print(
            "\nfake full-size generate 1024² nf4, measured / planner: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
        )
    # the step's weights alone are 5.8 GiB: a real full-size run, not a tiny model
    assert phases[1].peak > 5 * 2**30
    assert all(abs(r - 1) <= BAND for r in ratios.values()), ratios


def test_chunked_swapped_training_step_matches_planner(kernels_on, capsys):
    """A training step with token chunks and block swap through the real mechanisms (token_chunking.py, block_swap.py)
    on full-width FLUX with fewer blocks (1 double, 2 single): every phase within the band. The swapped block's
    host copies are not counted: the device holds the rest of the model and the swap's window only."""
    from urae_lite.flux_configs import flux_dev_config
    from urae_lite.measure.fake import device_tensors, fake_training_model, measure_train, train_recipe

    config = {**flux_dev_config(), "num_layers": 1, "num_single_layers": 2}
    overrides = ("memory.checkpointing=cpu", "memory.token_chunks=4", "memory.blocks_to_swap=1")
    with fake_mode():
        cfg = train_recipe(1024, "nf4", overrides)
        model = fake_training_model(cfg, config)
        swapped = model.single_transformer_blocks[1]
        on_device = {id(t) for t in device_tensors(model)}
        frozen = [t for t in swapped.parameters() if not t.requires_grad]
        assert frozen and not any(id(t) in on_device for t in frozen)  # host copies until the window fetches them
        phases, _ = measure_train(cfg, 1024, config)
    est = estimate(
        plan_config(
            task="train",
            width=1024,
            height=1024,
            quant="nf4",
            adapter="lora",
            rank=16,
            checkpointing="cpu",
            token_chunks=4,
            blocks_to_swap=1,
            transformer_config=config,
        )
    )
    planned = dict(zip(est.phases, est.allocated()))
    ratios = {p.name: p.peak / planned[p.name] for p in phases}
    with capsys.disabled():
        print(
            "\nfake chunked + swapped train 1024² nf4 (1 + 2 blocks), measured / planner: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
        )
    assert list(ratios) == list(est.phases)
    assert all(abs(r - 1) <= BAND for r in ratios.values()), ratios


@pytest.mark.parametrize("size", [1024, 2048])  # strips set the peak at 1024², the latent-size attention at 2048²
def test_tiled_decode_working_set_at_full_size(size):
    from urae_lite.vae_tiling import decode

    with fake_mode():
        vae = fake_vae()
        z = torch.empty(1, 16, size // 8, size // 8, dtype=torch.bfloat16)
        tracker = LiveBytes()
        tracker.hold([*module_tensors(vae), z])
        held = tracker.current
        with tracker:
            phase, image = measure(tracker, "VAE decode", lambda: decode(vae, z, mode="on", home_device=HOST))
    assert image.shape == (1, 3, size, size)
    planned = tiled_working_bytes(vae, size // 8, size // 8, torch.bfloat16, 1, 64)
    assert abs((phase.peak - held) / planned - 1) <= BAND, (phase.peak - held, planned)


def _peak(fn) -> int:
    with fake_mode():
        tracker = LiveBytes()
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
    return tracker.peak


def test_harness_allocates_as_cuda_autocast_does():
    """Under CPU autocast the harness gives layer_norm / rms_norm fp32 outputs (CUDA's policy) with the fused
    RMSNorm's allocations only, and a mixed-dtype cat without CPU autocast's copy of the narrower input."""
    T, D = 1024, 256

    def layer_norm() -> None:
        x = torch.empty(T, D, dtype=torch.bfloat16)
        assert F.layer_norm(x, (D,)).dtype == torch.float32

    def rms_norm() -> None:
        x, w = torch.empty(T, D, dtype=torch.bfloat16), torch.empty(D, dtype=torch.bfloat16)
        y = F.rms_norm(x, (D,), w)
        assert y.dtype == torch.float32 and y.shape == (T, D)

    def cat() -> None:
        torch.cat([torch.empty(T, D, dtype=torch.float32), torch.empty(T, D, dtype=torch.bfloat16)], dim=1)

    originals = (F.layer_norm, F.rms_norm, torch.cat)
    with cuda_autocast_policy():
        assert F.rms_norm is not originals[1]
        peaks = {fn.__name__: _peak(fn) for fn in (layer_norm, rms_norm, cat)}
    assert (F.layer_norm, F.rms_norm, torch.cat) == originals  # put back
    # x, its fp32 copy, the fp32 output, per-row mean and rstd
    assert peaks["layer_norm"] == T * D * (2 + 4 + 4) + 2 * T * 4
    # x and w, their fp32 copies, the output and per-row rstd: no composite temporaries
    assert peaks["rms_norm"] == T * D * (2 + 4 + 4) + D * (2 + 4) + T * 4
    assert peaks["cat"] == T * D * (4 + 2 + 2 * 4)  # the inputs and the fp32 output
    assert _peak(cat) == peaks["cat"] + T * D * 4  # CPU autocast alone: + an fp32 copy of the bf16 input


def test_harness_holds_flash_attentions_fp32_dq_buffer_in_backward():
    """CUDA's flash-attention backward accumulates dq in fp32 (q's size): the harness holds such a buffer from the
    output's gradient until q's gradient is out, only for SDPA calls that run a backward, and keeps no reference to
    q (checkpointing must still free it)."""
    B, H, T, Dh = 1, 2, 512, 64
    q_bytes = B * H * T * Dh

    def step(grad: bool) -> None:
        q, k, v = (torch.randn(B, H, T, Dh, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
        out = F.scaled_dot_product_attention(q * 1, k * 1, v * 1)
        if grad:
            out.float().sum().backward()

    def backward_peak(policy: bool) -> int:
        with cuda_autocast_policy() if policy else contextlib.nullcontext():
            return _peak(lambda: step(True))

    assert backward_peak(True) - backward_peak(False) == q_bytes * 4
    with cuda_autocast_policy():
        no_grad = _peak(lambda: step(False))
    assert no_grad == _peak(lambda: step(False))
    with cuda_autocast_policy():
        q = torch.randn(B, H, T, Dh, requires_grad=True) * 1
        ref = weakref.ref(q.untyped_storage())
        F.scaled_dot_product_attention(q, q.detach(), q.detach())
        del q
        assert ref() is None


def test_device_tensors_count_the_swap_windows_prefetched_block():
    """While a swapped block runs, block swap has already copied the next one to the device; those copies are not
    the next block's tensors until it runs, but they hold device memory (a phase after denoising, with offload
    `none`, holds that window): the harness counts them, as the planner's window (plan/swap.py) does."""
    from urae_lite.block_swap import block_swap_of
    from urae_lite.flux_configs import flux_dev_config
    from urae_lite.measure.fake import device_tensors, fake_transformer
    from urae_lite.measure.fake_models import apply_memory_options

    def held(tensors) -> int:
        tracker = LiveBytes()
        tracker.hold(tensors)
        return tracker.current

    with fake_mode():
        model = fake_transformer({**flux_dev_config(), "num_layers": 1, "num_single_layers": 3}, "nf4")
        apply_memory_options(model, MemorySettings(blocks_to_swap=2))  # single blocks 1 and 2
        block = held(module_tensors(model.single_transformer_blocks[0]))  # a resident one, the same shapes
        resident = held(device_tensors(model))
        swap = block_swap_of(model)
        with torch.no_grad():
            swap._enter(0)  # single block 1 runs and prefetches block 2
        assert held(device_tensors(model)) == resident + 2 * block
        swap.release_all()
        assert held(device_tensors(model)) == resident


def test_fake_models_keep_tied_weights():
    """T5's token embedding is one tensor shared by `shared` and the encoder: counted once, as on a GPU."""
    from transformers import T5EncoderModel

    _, t5 = text_encoder_configs()
    t5.num_layers = 1
    with fake_mode():
        model = fake_from_config(T5EncoderModel, t5)
    assert model.shared.weight is model.encoder.embed_tokens.weight
