"""Streaming loader: quantized FLUX from a diffusers folder, prepared checkpoints, host-memory bound, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import FluxTransformer2DModel
from references import assert_decodes, assert_quantizes
from torch import nn

from urae_lite.adapted_linear import AdaptedLinear
from urae_lite.errors import UraeError
from urae_lite.loader import adapted_layers, load_transformer
from urae_lite.minor import MINOR_SLICE, MinorSpec
from urae_lite.prepare import prepare
from urae_lite.safetensors_io import CheckpointReader
from urae_lite.targets import adapter_target_names


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("quant", ["nf4", "fp8", "bf16"])
def test_every_layer_holds_the_quantization_of_its_own_checkpoint_weight(tiny_flux, quant, monkeypatch):
    """Layer by layer: the stored buffers are the quantization of the checkpoint weight of the same name (element by
    element, tests/references.py: nearest NF4 level / e4m3 value, absmax and scales from that weight), and the
    library path decodes them to the float64 formula within the rounding of a correct decode. A weight streamed into
    the wrong layer, a mis-decoded block (bitsandbytes' native CPU decode at widths 32 and 160, which this model
    has) or a wrong layout fails here; the bias is the checkpoint's, bit for bit."""
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")
    model = load_transformer(tiny_flux, quant=quant, progress=False)
    reader = CheckpointReader(tiny_flux / "transformer")
    layers = dict(adapted_layers(model))
    cfg = model.config
    assert len(layers) == cfg.num_layers * 14 + cfg.num_single_layers * 6
    widths = set()
    for name, layer in layers.items():
        weight = reader.get(f"{name}.weight").to(torch.bfloat16)  # what the loader hands the quantizer
        assert layer.base.quant.name == quant and tuple(layer.base.shape) == tuple(weight.shape), name
        assert_quantizes(layer.base, weight)
        dequantized = layer.base.dequantize()
        assert dequantized.dtype == torch.bfloat16, name
        assert_decodes(dequantized, layer.base)
        assert torch.equal(layer.bias, reader.get(f"{name}.bias").to(torch.bfloat16)), name
        widths.add(weight.shape[1] % 64)
    assert 0 in widths and len(widths) > 1  # widths that are multiples of the NF4 block and widths that are not


@pytest.mark.parametrize("quant", ["bf16", "fp8", "nf4"])
def test_quantized_forward_is_diffusers_with_the_dequantized_weights(
    tiny_flux, tiny_config, make_inputs, quant, monkeypatch
):
    """The loaded model computes exactly what diffusers' own FluxTransformer2DModel (its from_pretrained) computes
    with each adapted linear's weight replaced by that layer's dequantized weight: every other tensor, the module
    wiring, the bias and the dtypes are diffusers'. With the test above (each dequantized weight is its checkpoint
    weight's quantization) this is the quantized model, with no tolerance to tune: nn.Linear adds the bias inside
    its GEMM and AdaptedLinear after it, so F.linear is made to add it after the GEMM on both sides; the same ops on
    the same shapes then give the same bits."""
    monkeypatch.setenv("URAE_LITE_KERNELS", "off")
    model = load_transformer(tiny_flux, quant=quant, progress=False)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert layers and all(m.base.quant.name == quant for m in layers)
    assert isinstance(model.proj_out, nn.Linear) and model.proj_out.weight.dtype == torch.bfloat16
    reference = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", dtype=torch.bfloat16)
    for name, layer in adapted_layers(model):
        linear = reference.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight.shape == layer.base.shape, name
        linear.weight.data = layer.base.dequantize()
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, w, b=None: real_linear(x, w) if b is None else real_linear(x, w) + b
    )
    inputs = make_inputs(tiny_config)
    with torch.no_grad():
        out, expected = model(**inputs).sample, reference(**inputs).sample
    assert out.shape == expected.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, expected)


def test_quantized_model_has_no_trainable_parameters(tiny_flux):
    model = load_transformer(tiny_flux, quant="nf4", progress=False)
    assert not any(p.requires_grad for p in model.parameters())
    n_linear = sum(isinstance(m, AdaptedLinear) for m in model.modules())
    cfg = model.config
    assert n_linear == cfg.num_layers * 14 + cfg.num_single_layers * 6  # FLUX: 19*14 + 38*6 = 494


def test_minor_adapter_initialised_while_streaming(tiny_flux, tiny_config, make_inputs):
    plain = load_transformer(tiny_flux, quant="nf4", progress=False)
    model = load_transformer(tiny_flux, quant="nf4", minor=MinorSpec(rank=4), progress=False)
    targets = adapter_target_names(model, "authors")
    assert len(targets) == tiny_config["num_layers"] * 4 + tiny_config["num_single_layers"] * 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.slices.{MINOR_SLICE}.{ab}" for t in targets for ab in "AB"}
    inputs = make_inputs(tiny_config)
    with torch.no_grad():
        a, b = plain(**inputs).sample, model(**inputs).sample
    assert _rel_err(b, a) < 1e-2  # +B0A0 - B0A0 cancels up to bf16 rounding of the branch
    # the trainable factors are the smallest singular triplets of the full-precision stored weight
    w = CheckpointReader(tiny_flux / "transformer").get(f"{targets[0]}.weight").float()
    s = model.get_submodule(targets[0]).slices[MINOR_SLICE]
    expected = torch.linalg.svdvals(w.double())[-4:]
    got = torch.linalg.svdvals(s.B.double() @ s.A.double())[:4]
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("quant", ["nf4", "fp8"])
def test_prepared_checkpoint_loads_bit_identical(tiny_flux, tmp_path, quant):
    direct = load_transformer(tiny_flux, quant=quant, progress=False)
    out = prepare(tiny_flux, tmp_path / "prepared", quant=quant, progress=False)
    assert json.loads((out / "urae_lite_quant.json").read_text())["quant"] == quant
    loaded = load_transformer(out, quant=quant, progress=False)
    a, b = direct.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k
    with pytest.raises(UraeError, match=f"was prepared as {quant}"):
        load_transformer(out, quant="bf16", progress=False)
    with pytest.raises(UraeError, match="need the full-precision weights"):
        load_transformer(out, quant=quant, minor=MinorSpec(rank=2), progress=False)


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import urae_lite.loader, diffusers, accelerate, bitsandbytes  # imports before the baseline
    from urae_lite.loader import adapted_layers, load_transformer
    from urae_lite.quant import QuantizedWeight
    QuantizedWeight.quantize(torch.randn(64, 64), "nf4")  # bnb's CPU library loads on first use (~200 MB)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load_transformer(sys.argv[1], quant="nf4", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": peak - base}))
""")


def test_streaming_load_peak_rss_stays_well_under_bf16_size(tmp_path):
    """~210M-parameter FLUX-shaped checkpoint: the load must never hold the bf16 model in host memory."""
    from urae_lite.tiny import write_random_transformer

    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=3,
        num_single_layers=6,
        attention_head_dim=128,
        num_attention_heads=8,
        joint_attention_dim=512,
        pooled_projection_dim=256,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    folder = write_random_transformer(tmp_path / "big", config, seed=0, max_shard_bytes=200 * 2**20)
    bf16_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert bf16_bytes > 350 * 2**20
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    # The NF4 model is 0.28x the bf16 size (4 bits + absmax; embedders stay bf16); one tensor in flight, the
    # quantizer's chunk temporaries and allocator slack add ~70 MiB: measured 0.45x. A load that materialised
    # the bf16 model would be ≥ 1x.
    assert growth < 0.6 * bf16_bytes, (growth / 2**20, bf16_bytes / 2**20)


def test_errors_are_one_clear_line(tiny_flux, tmp_path):
    with pytest.raises(UraeError, match="model not found"):
        load_transformer(tmp_path / "nope", progress=False)
    with pytest.raises(UraeError, match="unknown quantization 'int2'"):
        load_transformer(tiny_flux, quant="int2", progress=False)
    # a truncated shard
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux / "transformer", broken / "transformer")
    shard = next((broken / "transformer").glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UraeError, match="truncated or corrupt"):
        load_transformer(broken, progress=False)
    # a checkpoint that lacks one block linear's bias
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial" / "transformer"
    shutil.copytree(tiny_flux / "transformer", partial)
    shard = next(partial.glob("*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["transformer_blocks.1.attn.to_k.bias"]
    save_file(tensors, str(shard))
    with pytest.raises(UraeError, match=r"missing 1 tensors \(first: transformer_blocks.1.attn.to_k.bias\)"):
        load_transformer(partial.parent, progress=False)
    # a folder without FLUX files
    (tmp_path / "empty").mkdir()
    with pytest.raises(UraeError, match="no transformer/config.json"):
        load_transformer(tmp_path / "empty", progress=False)


@pytest.mark.parametrize("source", ["folder", "prepared"])
def test_park_blocks_leaves_exactly_the_swapped_blocks_frozen_tensors_in_host_memory(
    tiny_flux, tmp_path, monkeypatch, source
):
    """With block swap the loader parks the swapped blocks as they load (quantized on the device first), so loading
    never holds them on the device: the same blocks `enable_block_swap` takes, their frozen tensors only. The host
    is the meta device here, so the CPU can tell the two sides apart."""
    from urae_lite import loader
    from urae_lite.block_swap import swapped_block_names

    model = tiny_flux if source == "folder" else prepare(tiny_flux, tmp_path / "prep", "nf4", progress=False)
    minor = MinorSpec(rank=2, targets="authors", trainable=True) if source == "folder" else None
    reference = load_transformer(model, "nf4", "cpu", torch.bfloat16, minor=minor, progress=False)
    monkeypatch.setattr(loader, "HOST", torch.device("meta"))
    # (folders and prepared folders alike) its "still on meta = never loaded" rule cannot tell meta hosts apart
    monkeypatch.setattr(loader, "_check_complete", lambda model: None)
    parked = load_transformer(model, "nf4", "cpu", torch.bfloat16, minor=minor, park_blocks=2, progress=False)
    config = json.loads((tiny_flux / "transformer" / "config.json").read_text())
    swapped = swapped_block_names(config, 2)
    assert len(swapped) == 2 and swapped[-1] == f"single_transformer_blocks.{config['num_single_layers'] - 1}"
    tensors = dict(parked.named_parameters()) | dict(parked.named_buffers())
    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert tensors.keys() == expected.keys()
    on_host = []
    for name, t in tensors.items():
        if any(name.startswith(f"{b}.") for b in swapped) and not t.requires_grad:
            assert t.is_meta, name
            on_host.append(name)
        else:  # everything else, and the trainable minor factors of swapped blocks, where it loads, unchanged
            assert t.device.type == "cpu" and torch.equal(t, expected[name]), name
    assert any(".base." in n for n in on_host) and any(n.endswith("bias") for n in on_host)
    if minor is not None:
        assert any(t.requires_grad and any(n.startswith(f"{b}.") for b in swapped) for n, t in tensors.items())


def test_parking_does_not_depend_on_the_order_of_weight_and_bias():
    """A stream may bring a parked layer's weight before its bias (the bias is still on `meta` when the layer is
    parked): the bias lands in host memory when it arrives, and the model equals the one loaded bias-first."""
    from urae_lite.loader import LoadSpec, empty_transformer, fill_transformer
    from urae_lite.tiny import iter_random_transformer_tensors, tiny_transformer_config

    config = tiny_transformer_config()
    stream = list(iter_random_transformer_tensors(config))
    weights_first = sorted(stream, key=lambda kv: (kv[0].rpartition(".")[0], kv[0].endswith(".bias")))
    biases_first = sorted(stream, key=lambda kv: (kv[0].rpartition(".")[0], not kv[0].endswith(".bias")))
    spec = LoadSpec("nf4", "cpu", torch.bfloat16, park_blocks=2, progress=False)
    a = fill_transformer(empty_transformer(config), weights_first, spec)
    b = fill_transformer(empty_transformer(config), biases_first, spec)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
