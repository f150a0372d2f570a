"""Shared fixtures: every test reads the reference folders and photos from tests/fixtures."""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"
REFERENCE_DIRS = sorted(p for p in (FIXTURES / "reference").iterdir() if (p / "config.json").is_file())
IMAGES = FIXTURES / "images"


@pytest.fixture(params=REFERENCE_DIRS, ids=[p.name for p in REFERENCE_DIRS])
def ref_dir(request):
    """Each reference folder (today only `tiny`); tests must read every dimension from it."""
    return request.param


@pytest.fixture
def ref_config(ref_dir):
    return json.loads((ref_dir / "config.json").read_text())


def load_reference(ref_dir, variant="vicuna0"):
    """(tensors, json) recorded by the original code for `variant` in {"vicuna0", "llama2"}."""
    from safetensors.torch import load_file
    stem = "reference" if variant == "vicuna0" else "reference_llama2"
    return load_file(ref_dir / f"{stem}.safetensors"), json.loads((ref_dir / f"{stem}.json").read_text())


def assert_close(ours, ref, name="", rel=1e-5):
    """Max abs difference <= rel * max(1, max|ref|), the project's fp32 parity rule."""
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    tol = rel * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"{name}: max abs diff {err:.3e} > {tol:.3e}"
