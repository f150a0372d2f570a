"""bench_shapes.py: the miniature's stage-1 step, ours vs transformers, on the CPU (random tower, tiny batch)."""
import pytest
import torch

import bench_shapes
from conftest import smollm2_file


def test_random_tower_runs_and_prints_the_ratio(capsys):
    """Random tower, batch 2, one timed step: losses agree, the table and the ratio are printed, exit status 0;
    the thread count is restored afterwards."""
    pytest.importorskip("transformers")
    if smollm2_file() is None:
        pytest.skip("SmolLM2 GGUF absent: run `python fetch.py --model smollm2`")
    threads = torch.get_num_threads()
    code = bench_shapes.main(["--weights", "random", "--batch", "2", "--iters", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tower: random" in out and "MISMATCH" not in out, out
    assert "stage-1 step B=2, samples/s" in out and "ratio ours/transformers samples/s = " in out, out
    assert torch.get_num_threads() == threads
