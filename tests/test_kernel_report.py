"""kernel_report.py: the kernels compiled for sm80 and sm90 at the real call-site shapes (no GPU needed).

Runs the report in a subprocess (it installs a stand-in Triton driver) and asserts what makes the kernel
fast on those GPUs: no register spills, 128-bit global loads, cp.async pipelining at head dims 88/64/128 and
shared memory within the architecture's limit; wgmma on sm90 for the big tiles (ViT, prefill).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "kernel_report.py", "--json"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode and ("lacks the CUDA backend" in r.stderr or "triton is not installed" in r.stderr):
        pytest.skip(r.stderr.strip().splitlines()[-1])
    lines = [l for l in r.stdout.splitlines() if l.startswith("ROWS ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(lines[-1][len("ROWS "):])


def test_every_site_compiled(rows):
    import kernel_report as R
    want = {(a, n) for a in R.CAPABILITY for n, *_ in R.SITES}
    assert {(r["arch"], r["site"]) for r in rows} == want


def test_no_spills_and_shared_memory_fits(rows):
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["smem"] <= r["smem_limit"], r


def test_vectorised_pipelined_loads(rows):
    for r in rows:
        if r["kernel"] == "_attn_fwd":  # ViT d88, Q-Former d64, prefill d128: tensor-core tiles
            assert r["ld128"] > 0 and r["cp.async16"] > 0, r
            if r["site"] != "prefill":  # (prefill's only 16-bit loads are the key mask's)
                assert r["ld16"] == 0, r
        elif r["kernel"] == "_decode_split":  # one query: bandwidth-bound, 128-bit loads of K and V
            assert r["ld128"] > 0, r


def test_hopper_uses_wgmma(rows):
    for r in rows:
        if r["arch"] == "sm90" and r["site"] in ("vit", "prefill"):
            assert r["wgmma"] > 0 and r["mma.sync"] == 0, r
        if r["arch"] == "sm80" and r["kernel"] == "_attn_fwd":
            assert r["mma.sync"] > 0 and r["wgmma"] == 0, r
