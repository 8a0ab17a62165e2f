"""Exact strip-tiled VAE decode: equals the untiled decode, beats diffusers' blended tiling, uses less memory.

A tiny FLUX-like AutoencoderKL (16 latent channels, 4 up blocks = 8x upsampling, GroupNorm, mid attention, no
post_quant_conv) with random weights stands in for the real one; no weights are downloaded.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from urae_lite import vae_memory as vm
from urae_lite import vae_strips as vs
from urae_lite import vae_tiling as vt

FLUX_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "out_channels": 3,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions: one thread is as fast and does not collapse when other jobs share the two cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():  # GroupNorm affine away from identity, so a wrong affine/statistic cannot hide
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
    return model


def _latents(shape: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _untiled(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("shape", "strip_rows"),
    [
        ((1, 16, 13, 17), 1),  # one-row strips: every strip is mostly halo, in-place halos cross several strips
        ((1, 16, 13, 17), 3),
        ((1, 16, 40, 24), 5),
        ((1, 16, 33, 65), 7),
        ((1, 16, 33, 65), 64),  # one strip at the latent level, several at full resolution
        ((2, 16, 9, 11), 4),  # batch: statistics per (sample, group)
    ],
)
def test_matches_untiled_fp32(vae: AutoencoderKL, shape: tuple[int, ...], strip_rows: int) -> None:
    z = _latents(shape)
    ref = _untiled(vae, z)
    out = vt.decode_exact_tiled(vae, z, strip_rows=strip_rows)
    assert out.shape == ref.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
    assert out.dtype == torch.float32
    # fp32 summation order only (conv algorithms on strip shapes, per-strip statistics): ~1e-5 on values ~5.
    assert _maxdiff(out, ref) < 1e-4


@pytest.mark.parametrize(("shape", "strip_rows"), [((1, 16, 13, 17), 1), ((1, 16, 24, 20), 5), ((1, 16, 21, 33), 64)])
def test_matches_untiled_bf16(vae: AutoencoderKL, shape: tuple[int, ...], strip_rows: int) -> None:
    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    vae32 = copy.deepcopy(vae16).float()  # same (bf16-rounded) weights, fp32 activations: the reference
    z = _latents(shape, dtype=torch.bfloat16)
    ref32 = _untiled(vae32, z.float())
    ref16 = _untiled(vae16, z)
    out16 = vt.decode_exact_tiled(vae16, z, strip_rows=strip_rows)
    assert out16.dtype == torch.bfloat16 and out16.shape == ref16.shape
    bf16_err = _maxdiff(ref16, ref32)  # what bf16 rounding alone costs the untiled decode
    ours_err = _maxdiff(out16, ref32)
    vs_untiled = _maxdiff(out16, ref16)
    print(
        f"bf16 {tuple(shape[2:])} strips={strip_rows}: untiled-bf16 vs fp32 {bf16_err:.4f}, "
        f"tiled-bf16 vs fp32 {ours_err:.4f}, tiled vs untiled bf16 {vs_untiled:.4f}"
    )
    # Tolerance: bf16 keeps 8 significant bits (1 ulp = 0.03 at |x| in [4, 8)), and each of ~25 layers rounds
    # its output, so the untiled bf16 decode is itself off fp32 by bf16_err (0.06-0.12 here). The tiled decode
    # performs the same roundings in another summation order, so it must be as close to fp32 (within 1.5x;
    # 0.88-1.19x over 18 seed/size cases), and its distance to the untiled bf16 decode must be of the same
    # order as bf16 rounding itself (within 2x; 0-1.25x observed, i.e. 0-4 ulps at the largest values).
    assert ours_err <= 1.5 * bf16_err
    assert vs_untiled <= 2.0 * bf16_err


def test_exact_vs_diffusers_blended_tiling(vae: AutoencoderKL) -> None:
    blended = copy.deepcopy(vae)
    blended.enable_tiling()
    blended.tile_sample_min_size = 64  # 8x8 latent tiles, 25% overlap: the blended path really runs
    blended.tile_latent_min_size = 8
    blended.tile_overlap_factor = 0.25
    report = []
    for shape in [(1, 16, 13, 17), (1, 16, 40, 24), (1, 16, 33, 65)]:
        z = _latents(shape, seed=3)
        ref = _untiled(vae, z)
        ours = _maxdiff(vt.decode_exact_tiled(vae, z, strip_rows=8), ref)
        theirs = _maxdiff(_untiled(blended, z), ref)
        report.append((shape[2:], ours, theirs))
        assert ours < 1e-4
        assert theirs > 100 * ours, (ours, theirs)
    print("\nmax |tiled - untiled| (fp32, tiny VAE): exact strips vs diffusers enable_tiling (blended)")
    for hw, ours, theirs in report:
        print(f"  latent {hw[0]}x{hw[1]}: exact {ours:.2e}   blended {theirs:.2e}   ratio {theirs / ours:.0f}x")


def test_output_written_fresh(vae: AutoencoderKL, monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(self, shape, device):  # every buffer starts as NaN: an unwritten row would show
        return torch.full(shape, float("nan"), dtype=self.dtype, device=device)

    monkeypatch.setattr(vs.StripContext, "alloc", poisoned)
    z = _latents((1, 16, 11, 14))
    z_before = z.clone()
    out = vt.decode_exact_tiled(vae, z, strip_rows=4, home_device="cpu")
    assert out.shape == (1, 3, 88, 112) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(z, z_before)  # in-place strips never write into the caller's latents
    assert _maxdiff(out, _untiled(vae, z)) < 1e-4


# ---------------------------------------------------------------------------------------------------- memory


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (inputs and weights are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.size: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.cur = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.cur -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key not in self.size:
                self.size[key] = storage.nbytes()
                self.refs[key] = 0
                self.cur += storage.nbytes()
                self.peak = max(self.peak, self.cur)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def test_peak_live_bytes_below_untiled(vae: AutoencoderKL) -> None:
    z = _latents((1, 16, 64, 64))  # 512x512 image
    with torch.no_grad(), _LiveBytes() as untiled:
        ref = _untiled(vae, z)
    with _LiveBytes() as tiled:
        out = vt.decode_exact_tiled(vae, z, strip_rows=16)
    assert _maxdiff(out, ref) < 1e-4
    est = vm.estimate_untiled_decode_bytes(vae, 512, 512, torch.float32)
    print(
        f"\npeak live bytes at 512x512 fp32: untiled {untiled.peak / 2**20:.1f} MiB "
        f"(estimate {est / 2**20:.1f} MiB), exact tiled {tiled.peak / 2**20:.1f} MiB"
    )
    assert untiled.peak > 0 and tiled.peak > 0
    assert tiled.peak < 0.5 * untiled.peak
    assert 0.8 * untiled.peak <= est <= 1.25 * untiled.peak  # the formula models diffusers' liveness


def test_estimate_and_should_tile(vae: AutoencoderKL) -> None:
    bf16 = torch.bfloat16
    sizes = [vm.estimate_untiled_decode_bytes(FLUX_VAE_CONFIG, s, s, bf16) for s in (1024, 2048, 4096)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] > 14 * 2**30  # a plain 4K decode does not fit a 16 GB card
    assert vm.estimate_untiled_decode_bytes(FLUX_VAE_CONFIG, 4096, 4096, bf16, batch=2) == 2 * sizes[2]
    assert vm.estimate_untiled_decode_bytes(FLUX_VAE_CONFIG, 4096, 4096, torch.float32) == 2 * sizes[2]
    # the stored maps of the tiled decode at 4K are a quarter of the untiled peak
    assert vm.tiled_home_bytes(FLUX_VAE_CONFIG, 512, 512, bf16, 1) <= sizes[2] // 4
    assert vm.should_tile(vae, 1024, 1024, free_bytes=1 << 20)
    assert not vm.should_tile(vae, 1024, 1024, free_bytes=1 << 40)


def test_decode_modes(vae: AutoencoderKL, monkeypatch: pytest.MonkeyPatch) -> None:
    z = _latents((1, 16, 9, 10))
    ref = _untiled(vae, z)
    with pytest.raises(ValueError, match="bogus") as info:
        vt.decode(vae, z, mode="bogus")
    assert all(m in str(info.value) for m in ("auto", "on", "off"))
    assert torch.equal(vt.decode(vae, z, mode="off"), ref)
    assert _maxdiff(vt.decode(vae, z, mode="on", strip_rows=4), ref) < 1e-4

    calls = []
    real = vt.decode_exact_tiled

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vt, "decode_exact_tiled", spy)
    assert _maxdiff(vt.decode(vae, z, mode="auto", free_bytes=1024), ref) < 1e-4
    assert calls == [1]  # too little memory: tiled
    assert torch.equal(vt.decode(vae, z, mode="auto", free_bytes=1 << 40), ref)
    assert calls == [1]  # plenty: plain decode


def test_rejects_what_it_cannot_reproduce(vae: AutoencoderKL) -> None:
    z = _latents((1, 16, 5, 6))
    with pytest.raises(ValueError, match="strip_rows"):
        vt.decode_exact_tiled(vae, z, strip_rows=0)
    odd = copy.deepcopy(vae)
    odd.decoder.up_blocks[1].resnets[0].conv1.padding_mode = "reflect"
    with pytest.raises(NotImplementedError, match="padding_mode"):
        vt.decode_exact_tiled(odd, z)
    odd = copy.deepcopy(vae)
    odd.decoder.up_blocks[0].upsamplers[0].use_conv_transpose = True
    with pytest.raises(NotImplementedError, match="upsampler"):
        vt.decode_exact_tiled(odd, z)


def test_home_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    z = torch.empty((1, 16, 512, 512), device="meta")  # a 4K FLUX latent; only its shape is read
    cuda, cpu, bf16 = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16
    assert vt.default_home_device(FLUX_VAE_CONFIG, cpu, z, bf16, 64) == cpu
    monkeypatch.setattr(vt, "_free_device_bytes", lambda device: 40 << 30)
    assert vt.default_home_device(FLUX_VAE_CONFIG, cuda, z, bf16, 64) == cuda  # 6 GiB of stored maps fit
    monkeypatch.setattr(vt, "_free_device_bytes", lambda device: 8 << 30)
    assert vt.default_home_device(FLUX_VAE_CONFIG, cuda, z, bf16, 64) == cpu
    monkeypatch.setattr(vt, "_free_device_bytes", lambda device: None)
    assert vt.default_home_device(FLUX_VAE_CONFIG, cuda, z, bf16, 64) == cpu
    # the threshold: stored maps + working set, with the one headroom of vae_memory.py
    need = (
        vm.tiled_home_bytes(FLUX_VAE_CONFIG, 512, 512, bf16, 1)
        + vm.tiled_working_bytes(FLUX_VAE_CONFIG, 512, 512, bf16, 1, 64)
    ) * vm.HEADROOM
    monkeypatch.setattr(vt, "_free_device_bytes", lambda device: int(need) + 1)
    assert vt.default_home_device(FLUX_VAE_CONFIG, cuda, z, bf16, 64) == cuda
    monkeypatch.setattr(vt, "_free_device_bytes", lambda device: int(need) - 1)
    assert vt.default_home_device(FLUX_VAE_CONFIG, cuda, z, bf16, 64) == cpu
