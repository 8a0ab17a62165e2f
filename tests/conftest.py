"""Shared fixtures: tiny FLUX folders built once per session, deterministic transformer inputs, and the suite's one
seed switch.

Seeds. Every test runs with its own seed, derived from the base seed `URAE_TEST_SEED` (default 0) and the test's id
(file name, test name, parameters), so two runs give the same results and running one test alone gives the same
inputs as running it in the suite:

* the `seed` fixture is that seed (an int, for `torch.Generator().manual_seed(seed)`);
* before every test, torch's, numpy's and Python's global generators are seeded with it too, so code that draws
  from the global generators (`torch.randn` without a generator, `nn.Linear` init) is deterministic as well;
* `URAE_TEST_SEED=<int> python -m pytest ...` changes the seed of every test (run it with a few values to try
  fresh inputs); a failing test's report prints the base seed and the command that replays it.

Tolerances never depend on the seed: each comes from an error analysis written beside it.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in the numpy interpreter; Triton decides interpreter vs compiler when
# the kernels are first imported, so this must run before anything imports urae_lite.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED_ENV = "URAE_TEST_SEED"


def base_seed() -> int:
    """The suite's base seed: `URAE_TEST_SEED` (an integer), 0 when unset."""
    value = os.environ.get(SEED_ENV, "0").strip()
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={value!r} is not an integer") from None


def seed_for(nodeid: str) -> int:
    """The seed of the test `nodeid` under the current base seed: a hash of both (stable across processes and
    machines, unlike Python's `hash`), independent of the folder pytest runs from and of which tests run."""
    file, _, test = nodeid.partition("::")
    key = f"{base_seed()}:{Path(file).name}::{test}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % 2**31


@pytest.fixture
def seed(request) -> int:
    """This test's seed (see the module docstring); replay or vary it with URAE_TEST_SEED."""
    return seed_for(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    seed = seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pytest_report_header(config):
    return f"{SEED_ENV}={base_seed()} (per-test seeds derive from it and the test id; see tests/conftest.py)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(
            (
                "seed",
                f"{SEED_ENV}={base_seed()} (this test's seed: {seed_for(item.nodeid)}); replay with\n"
                f"  {SEED_ENV}={base_seed()} python -m pytest '{item.nodeid}'",
            )
        )


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A complete tiny FLUX.1-dev folder in diffusers layout (pipeline root)."""
    from urae_lite.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux-dev", seed=0, variant="dev")


@pytest.fixture(scope="session")
def tiny_config():
    from urae_lite.tiny import tiny_transformer_config

    return tiny_transformer_config("dev")


def transformer_inputs(
    config: dict,
    height_tokens: int = 4,
    width_tokens: int = 6,
    text_tokens: int = 7,
    seed: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Random but valid FluxTransformer2DModel inputs (packed latents, ids, embeddings)."""
    g = torch.Generator().manual_seed(seed)
    n_img = height_tokens * width_tokens
    img_ids = torch.zeros(height_tokens, width_tokens, 3)
    img_ids[..., 1] = torch.arange(height_tokens)[:, None]
    img_ids[..., 2] = torch.arange(width_tokens)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, n_img, config["in_channels"], generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g).to(dtype),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(dtype),
        timestep=torch.tensor([0.7]),
        img_ids=img_ids.reshape(n_img, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@pytest.fixture(scope="session")
def make_inputs():
    return transformer_inputs


# ---- fp32 equality across different row counts ------------------------------------------------------------------
# A CPU matrix multiply's rounding depends on the number of rows (and the BLAS build): runs that split tokens
# differently (token chunks) agree only up to rounding. Tests that compare such runs bit for bit send every linear
# through `rowwise_linear`, which computes each output row the same way whatever the number of rows.
def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear whose every output row is computed the same way whatever the number of rows; under autocast it
    computes in autocast's dtype, as autocast runs F.linear."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


@pytest.fixture
def row_independent(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "linear", rowwise_linear)
