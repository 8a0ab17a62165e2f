"""`urae-lite export`: kohya (ComfyUI / Forge) LoRAs that diffusers' own kohya reader loads to the same model."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_adapters import write_authors_2k

from urae_lite.cli import main
from urae_lite.errors import UraeError


def _block_linears(config):
    """(name, meta Linear) of every linear in FLUX's double and single blocks, in module order."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_transformer")):
            yield name, m


def _all_targets_lora(path, config, seed=0):
    """diffusers-keyed LoRA on every block linear, alpha = 2·rank, uneven ranks and a missing to_v (padding)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in _block_linears(config):
        if name == "transformer_blocks.0.attn.to_v":
            continue
        rank = 2 if name.endswith("to_k") else 4
        state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.1).bfloat16()
        state[f"transformer.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.1).bfloat16()
        state[f"transformer.{name}.alpha"] = torch.tensor(2.0 * rank)
    save_file(state, str(path))
    return path


@pytest.fixture
def tiny_kohya_reader(monkeypatch, tiny_config):
    """diffusers' kohya reader hard-codes FLUX.1's linear1 split (3072 x 3, 12288); use the tiny widths."""
    from diffusers.loaders import lora_conversion_utils as lcu
    from diffusers.loaders import lora_pipeline

    h = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    assert "dims=[3072, 3072, 3072, 12288]" in src
    namespace = dict(vars(lcu))
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{h}, {h}, {h}, {4 * h}]"), namespace)  # noqa: S102 -- diffusers' own source, one constant changed
    for module in (lcu, lora_pipeline):
        monkeypatch.setattr(
            module, "_convert_kohya_flux_lora_to_diffusers", namespace["_convert_kohya_flux_lora_to_diffusers"]
        )


def _output_with_lora(tiny_flux, lora, inputs):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        return pipe.transformer(**inputs).sample


@pytest.mark.parametrize("which", ["all_targets", "authors_2k"])
def test_kohya_export_loads_in_diffusers_to_same_output(
    tmp_path, tiny_flux, tiny_config, make_inputs, tiny_kohya_reader, which
):
    src = tmp_path / "lora.safetensors"
    _all_targets_lora(src, tiny_config) if which == "all_targets" else write_authors_2k(src, tiny_config)
    out = tmp_path / "lora_kohya.safetensors"
    assert main(["export", str(src), "--format", "kohya", "--out", str(out)]) == 0
    keys = load_file(str(out))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert all(k.startswith("lora_unet_") for k in keys)
    inputs = make_inputs(tiny_config, dtype=torch.float32)
    ref = _output_with_lora(tiny_flux, src, inputs)
    got = _output_with_lora(tiny_flux, out, inputs)
    with torch.no_grad():
        from diffusers import FluxTransformer2DModel

        base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")(**inputs).sample
    assert (ref - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which,scale", [("all_targets", 2.0), ("authors_2k", 1.0)])
def test_diffusers_export_roundtrip(tmp_path, tiny_config, which, scale):
    """Every factor comes back bit for bit (bf16 in, bf16 out: no arithmetic on the way), with its scale."""
    from urae_lite.adapter_io import read_adapter

    src = tmp_path / "lora.safetensors"  # all_targets: alpha = 2·rank (scale 2); the authors' 2K: no alpha (scale 1)
    _all_targets_lora(src, tiny_config) if which == "all_targets" else write_authors_2k(src, tiny_config)
    out = tmp_path / "d.safetensors"
    assert main(["export", str(src), "--format", "diffusers", "--out", str(out)]) == 0
    a, b = read_adapter(src), read_adapter(out)
    assert a.kind == b.kind == "lora" and set(a.modules) == set(b.modules)
    for name, f in a.modules.items():
        g = b.modules[name]
        assert f.A.dtype == g.A.dtype == f.B.dtype == g.B.dtype == torch.bfloat16, name
        assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B), name
        assert f.scale == g.scale == scale, name
    raw_in, raw_out = load_file(str(src)), load_file(str(out))  # and on disk: the same keys, tensors and alphas
    assert raw_in.keys() == raw_out.keys() and all(torch.equal(raw_in[k], raw_out[k]) for k in raw_in)


def test_fused_parts_are_exact():
    from urae_lite.adapter_io import LoraFactors
    from urae_lite.export import fuse_parts

    g = torch.Generator().manual_seed(0)
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    present = {
        0: LoraFactors(torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g), 0.5),
        3: LoraFactors(torch.randn(2, 8, generator=g), torch.randn(32, 2, generator=g), 2.0),
    }
    fused = fuse_parts(parts, present)
    delta = fused.delta()
    assert delta.shape == (8 * 3 + 32, 8)
    torch.testing.assert_close(delta[:8], present[0].delta())
    assert delta[8:24].abs().max() == 0
    torch.testing.assert_close(delta[24:], present[3].delta())


def test_export_refuses_unconverted_4k(tmp_path, tiny_config):
    from synthetic_adapters import write_authors_4k

    src = write_authors_4k(tmp_path / "urae_4k_adapter.safetensors", tiny_config)
    with pytest.raises(UraeError, match="urae-lite convert"):
        from urae_lite.export import export_adapter

        export_adapter(src, "kohya", tmp_path / "x.safetensors")


def _same_tensors(a_path, b_path) -> bool:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_and_train_write_kohya_too(tmp_path, tiny_flux, tiny_config):
    """`convert --format kohya` and `train --format kohya` write exactly what `export --format kohya` makes of their
    diffusers-format output."""
    from synthetic_adapters import write_authors_4k

    from urae_lite.loader import add_lora, load_transformer
    from urae_lite.train.config import load_recipe
    from urae_lite.train.model import export_adapters

    f2 = write_authors_2k(tmp_path / "a2k.safetensors", tiny_config)
    f4 = write_authors_4k(tmp_path / "a4k.safetensors", tiny_config)
    for fmt in ("diffusers", "kohya"):
        args = ["convert", str(f2), str(f4), "--model", str(tiny_flux), "--out", str(tmp_path / f"{fmt}.safetensors")]
        assert main(args + ["--format", fmt]) == 0
    exported = tmp_path / "exported.safetensors"
    assert main(["export", str(tmp_path / "diffusers.safetensors"), "--out", str(exported)]) == 0
    kohya_keys = load_file(tmp_path / "kohya.safetensors")
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in kohya_keys)
    assert _same_tensors(tmp_path / "kohya.safetensors", tmp_path / "exported.safetensors")

    model = load_transformer(tiny_flux, "bf16", progress=False)
    add_lora(model, "lora", 4, seed=1)
    for layer in model.modules():
        if hasattr(layer, "slices") and "lora" in layer.slices:
            torch.nn.init.normal_(layer.slices["lora"].B, std=0.1)
    recipe = "recipes/train_2k_lora.yaml"
    cfg = load_recipe(recipe, ["data.dir=d", f"output_dir={tmp_path}", "output_format=kohya"])
    files = export_adapters(model, cfg, tmp_path / "run", {})
    assert [f.name for f in files] == ["adapter.safetensors", "adapter_kohya.safetensors"]
    assert main(["export", str(files[0]), "--out", str(tmp_path / "run_exported.safetensors")]) == 0
    assert _same_tensors(files[1], tmp_path / "run_exported.safetensors")
    with pytest.raises(UraeError, match="output_format=ckpt is not one of"):
        load_recipe(recipe, ["data.dir=d", f"output_dir={tmp_path}", "output_format=ckpt"])


def _loaded_deltas(tiny_flux, lora) -> dict[str, torch.Tensor]:
    """scale·B·A in float64 of every LoRA layer diffusers' `load_lora_weights` puts on the transformer."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    deltas = {}
    for name, m in pipe.transformer.named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A):
            (adapter,) = m.lora_A.keys()
            A, B = m.lora_A[adapter].weight.double(), m.lora_B[adapter].weight.double()
            deltas[name] = m.scaling[adapter] * B @ A
    return deltas


def test_converted_4k_kohya_file_loads_in_diffusers_as_the_authors_adapters(
    tmp_path, tiny_flux, tiny_config, tiny_kohya_reader
):
    """`convert --format kohya` read by diffusers' own kohya reader (not our export code): every target's update
    scale·B·A is the diffusers-format file's, and the authors' 2K + 4K update B2·A2 − B0·A0 + B'·A'."""
    from synthetic_adapters import author_targets, write_authors_4k

    from urae_lite.loader import fused_like_authors
    from urae_lite.minor import minor_components

    f2 = write_authors_2k(tmp_path / "a2k.safetensors", tiny_config)
    f4 = write_authors_4k(tmp_path / "a4k.safetensors", tiny_config)
    for fmt in ("diffusers", "kohya"):
        args = ["convert", str(f2), str(f4), "--model", str(tiny_flux), "--out", str(tmp_path / f"{fmt}.safetensors")]
        assert main(args + ["--format", fmt]) == 0
    assert any(
        k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(tmp_path / "kohya.safetensors")
    )
    kohya = _loaded_deltas(tiny_flux, tmp_path / "kohya.safetensors")
    plain = _loaded_deltas(tiny_flux, tmp_path / "diffusers.safetensors")
    targets = author_targets(tiny_config)
    assert set(plain) == set(targets) and set(targets) <= set(kohya)
    # linear1's proj_mlp rows carry no LoRA: the fused file holds zeros there, which the reader may keep
    assert all(kohya[n].abs().max() == 0 for n in set(kohya) - set(targets))
    for name in targets:
        # both are float64 products of the same bf16 factors (the fused file's zero blocks add exact zeros); only
        # the summation order may differ: ≤ 48·2^-53·Σ|b·a| < 1e-13 for factors below 1
        torch.testing.assert_close(kohya[name], plain[name], rtol=0, atol=1e-13, msg=name)

    w0 = load_file(str(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors"))
    sd2, sd4 = load_file(str(f2)), load_file(str(f4))
    for name in targets:
        block, proj = name.split(".attn.")
        short = "out" if proj == "to_out.0" else proj[3:]
        A2, B2 = (sd2[f"transformer.{name}.lora_{x}.weight"] for x in "AB")
        A4, B4 = (sd4[f"{block}.attn.processor.to_{short}_{x}.weight"] for x in "ab")
        w = w0[f"{name}.weight"]
        # the authors' SVD input: W0 + B2·A2 as a fused bf16 model holds it (the same fp32 arithmetic as `convert`)
        B0, A0 = minor_components(fused_like_authors(w.float() + B2.float() @ A2.float(), w.dtype), A4.shape[0])
        expected = B2.double() @ A2.double() - B0.double() @ A0.double() + B4.double() @ A4.double()
        # the files store the factors in bf16 (8 significant bits: relative rounding ≤ u = 2^-8): B2, A2, B', A'
        # are bf16 already (exact); B0 and A0 round once each, so each product b0·a0 moves by ≤ (2u + u²)·|b0·a0|
        bound = (2**-7 + 2**-16) * (B0.double().abs() @ A0.double().abs()) + 1e-12
        assert ((kohya[name] - expected).abs() <= bound).all(), name
        assert (expected - B2.double() @ A2.double()).abs().max() > 10 * bound.max()  # the 4K part is there


# ---- mixed scales inside one fused module ------------------------------------------------------------------------
U_BF16, U_FP32, U_FP64 = 2.0**-8, 2.0**-24, 2.0**-53  # unit roundoff (round to nearest) of 8, 24, 53-bit significands
# (rank, alpha) per block-relative module; every alpha is exact in fp32, the default is (4, 4): scale 1
MIXED = {
    "transformer_blocks.0.attn.to_q": (4, 4.0),  # img qkv: 1, 0.75, 0.5 -- the ratio 0.75 is not a power of two
    "transformer_blocks.0.attn.to_k": (4, 3.0),
    "transformer_blocks.0.attn.to_v": (2, 1.0),
    "transformer_blocks.0.attn.add_q_proj": (4, 8.0),  # txt qkv: 2, 0.5, 1 -- all powers of two
    "transformer_blocks.0.attn.add_k_proj": (2, 1.0),
    "transformer_blocks.1.attn.to_q": (4, 3.0),  # img qkv: one shared scale 0.75 (kept in alpha), ranks 4, 2, 4
    "transformer_blocks.1.attn.to_k": (2, 1.5),
    "transformer_blocks.1.attn.to_v": (4, 3.0),
    "transformer_blocks.1.attn.add_q_proj": (4, 6.0),  # txt qkv: 1.5, 0.75, 3 -- ratios powers of two, scales not
    "transformer_blocks.1.attn.add_k_proj": (4, 3.0),
    "transformer_blocks.1.attn.add_v_proj": (2, 6.0),
    "transformer_blocks.1.ff.net.2": (2, 3.0),  # a single-part module at 1.5
    "single_transformer_blocks.0.attn.to_q": (3, 1.0),  # linear1: 1/3, 1, (no v), 2; ranks 3, 2, -, 4
    "single_transformer_blocks.0.attn.to_k": (2, 2.0),
    "single_transformer_blocks.0.attn.to_v": None,
    "single_transformer_blocks.0.proj_mlp": (4, 8.0),
    **{f"single_transformer_blocks.1.{p}": (4, 8.0) for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
}
FP32_GROUPS = {"double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1"}


def _mixed_scales_lora(path, config, seed=0):
    """diffusers-keyed LoRA on every block linear with the ranks and alphas of MIXED."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in _block_linears(config):
        if (spec := MIXED.get(name, (4, 4.0))) is None:
            continue
        rank, alpha = spec
        state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.1).bfloat16()
        state[f"transformer.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.1).bfloat16()
        state[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def _bfl_rows(name: str, hidden: int) -> tuple[str, int, int | None]:
    """diffusers module -> (kohya key, its rows in that fused module), written from the BFL layout by hand."""
    from bfl_files import DOUBLE_RENAMES

    kind, index, rest = name.split(".", 2)
    if kind == "transformer_blocks":
        for stream, fmt in (("img", "attn.to_{}"), ("txt", "attn.add_{}_proj")):
            for j, x in enumerate("qkv"):
                if rest == fmt.format(x):
                    return f"lora_unet_double_blocks_{index}_{stream}_attn_qkv", j * hidden, (j + 1) * hidden
        bfl = DOUBLE_RENAMES[rest]
        return f"lora_unet_double_blocks_{index}_{bfl.replace('.', '_')}", 0, None
    for j, x in enumerate("qkv"):
        if rest == f"attn.to_{x}":
            return f"lora_unet_single_blocks_{index}_linear1", j * hidden, (j + 1) * hidden
    bfl = {"proj_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation_lin"}[rest]
    return f"lora_unet_single_blocks_{index}_{bfl}", 3 * hidden if rest == "proj_mlp" else 0, None


def _reference(f) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's own update scale·B·A in float64, and scale·|B|·|A| (what the rounding bounds scale with)."""
    B, A = f.B.double(), f.A.double()
    return f.scale * B @ A, abs(f.scale) * B.abs() @ A.abs()


def test_kohya_export_mixed_scales_is_exact(tmp_path, tiny_config):
    """Per original module, the kohya file's alpha/rank · up·down (float64 from the stored tensors) is the adapter's
    scale·B·A: bit-exact arithmetic where the factors stay bf16, one fp32 rounding of scale·B where a fused module's
    scales differ by a ratio that is not a power of two. Unmixed and power-of-two groups keep today's bf16 bytes."""
    from urae_lite.adapter_io import read_adapter

    src = _mixed_scales_lora(tmp_path / "mixed.safetensors", tiny_config)
    out = tmp_path / "kohya.safetensors"
    assert main(["export", str(src), "--format", "kohya", "--out", str(out)]) == 0
    sd, adapter = load_file(str(out)), read_adapter(src)
    hidden = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    assert {f.scale for f in adapter.modules.values()} == {1.0, 0.75, 0.5, 2.0, 1.5, 3.0, 1 / 3}
    off = []
    for name, f in adapter.modules.items():
        key, start, stop = _bfl_rows(name, hidden)
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
        up = up[start : start + f.B.shape[0]]
        assert stop is None or stop - start == f.B.shape[0]
        got = (alpha.double() / down.shape[0]) * up.double() @ down.double()
        ref, mag = _reference(f)
        # stored bf16: the factors are the adapter's own (times a power of two at most), so only float64's summation
        # of ≤ rank products differs (≤ rank·u64·Σ|s·b·a|); stored fp32: scale·B rounds once (≤ u32·|s·b|)
        u = (U_FP32 if down.dtype == torch.float32 else 0.0) + down.shape[0] * U_FP64
        if not ((got - ref).abs() <= u * mag).all():  # reported as a fraction of the update
            off.append(f"{name} (scale {f.scale:.4g}): off by {((got - ref).abs().max() / ref.abs().max()):.1e}")
        if down.dtype == torch.float32:  # a mixed group: scale 1, which every reader applies without arithmetic
            assert alpha.item() == down.shape[0], name
        if down.dtype == torch.bfloat16 and key.startswith(
            ("lora_unet_single_blocks_1_", "lora_unet_double_blocks_1_img")
        ):
            # unmixed groups as before: the parts' own bf16 factors bit for bit, the shared scale in alpha
            rows = up.abs().sum(0).nonzero().flatten()
            assert torch.equal(up[:, rows], f.B) and torch.equal(down[rows], f.A), name
            assert alpha.item() == f.scale * down.shape[0], name
    assert not off, "\n".join(off)
    weights = {k: t for k, t in sd.items() if k.endswith(("lora_down.weight", "lora_up.weight"))}
    fp32 = {k.rsplit(".", 2)[0] for k, t in weights.items() if t.dtype == torch.float32}
    assert fp32 == {"lora_unet_" + g.replace(".", "_") for g in FP32_GROUPS}  # only where bf16 cannot be exact
    assert all(t.dtype == torch.bfloat16 for k, t in weights.items() if k.rsplit(".", 2)[0] not in fp32)


def _reader_bound(sd: dict[str, torch.Tensor], key: str) -> float:
    """Rounding diffusers' kohya reader adds: it multiplies alpha/rank into the stored factors (down, and up too for
    alpha/rank < 1/2), in their dtype: each rounds at most once, (1 + u)² − 1 = 2u + u² of the update."""
    down, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.alpha"].item()
    exact = abs(math.frexp(alpha / down.shape[0])[0]) == 0.5  # a power of two moves exponents only
    u = U_FP32 if down.dtype == torch.float32 else U_BF16
    return 0.0 if exact else 2 * u + u * u


def test_mixed_scales_kohya_loads_in_diffusers_and_back(tmp_path, tiny_flux, tiny_config, tiny_kohya_reader):
    """diffusers' own kohya reader (`load_lora_weights`) puts the same update scale·B·A on every module as it does
    from our diffusers-format file, and `read_adapter` (through that reader) gives back the adapter's factors'
    update: the kohya file round-trips."""
    from urae_lite.adapter_io import read_adapter

    src = _mixed_scales_lora(tmp_path / "mixed.safetensors", tiny_config)
    kohya, plain = tmp_path / "kohya.safetensors", tmp_path / "plain.safetensors"
    assert main(["export", str(src), "--format", "kohya", "--out", str(kohya)]) == 0
    assert main(["export", str(src), "--format", "diffusers", "--out", str(plain)]) == 0
    sd, adapter, back = load_file(str(kohya)), read_adapter(src), read_adapter(kohya)
    from_kohya, from_plain = _loaded_deltas(tiny_flux, kohya), _loaded_deltas(tiny_flux, plain)
    hidden = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    assert set(from_plain) == set(adapter.modules) and set(adapter.modules) <= set(from_kohya) == set(back.modules)
    # a part without a LoRA (single block 0's to_v) comes back as zeros: the fused file's zero block
    from_back = {n: _reference(g)[0] for n, g in back.modules.items()}
    assert all(
        from_kohya[n].abs().max() == 0 == from_back[n].abs().max() for n in set(back.modules) - set(adapter.modules)
    )
    for name, f in adapter.modules.items():
        ref, mag = _reference(f)
        key = _bfl_rows(name, hidden)[0]
        # the file's own rounding (fp32 groups: u32, else none; see the test above), the reader's fold of alpha/rank
        # into down (none for a power of two: every mixed group has alpha = rank), float64 sums of ≤ 16 products;
        # `load_lora_weights` holds the factors in fp32 (the pipeline's dtype), which bf16 and fp32 values pass exactly;
        # for the diffusers file it holds scale = alpha / r in fp32: exact but for 1/3, which only an fp32 group has
        u = (U_FP32 if sd[f"{key}.lora_down.weight"].dtype == torch.float32 else 0.0) + _reader_bound(sd, key)
        u += 16 * U_FP64
        for got in (from_kohya[name], from_back[name], from_plain[name]):
            assert ((got - ref).abs() <= u * mag).all(), name
