"""bench_quant.py runs its three modes on the CPU and reports each against float, measured in the same run."""
import bench_quant


def test_decode_table_on_cpu(capsys):
    assert bench_quant.main(["--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if "tok/s" in line]
    assert rows == ["float32", "int8", "int4"] and "float32" in out and "(1.00x)" in out
