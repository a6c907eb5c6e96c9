"""`benchmark-scan`'s bandwidth table: the byte count it divides by, and a run of the table on the CPU."""

import torch

from nnunet_segmamba.mamba.scan import selective_scan
from nnunet_segmamba.tools.scan_benchmark import print_bandwidth, scan_bandwidth, scan_bytes


def test_scan_bytes_counts_every_input_output_and_gradient_once():
    # batch 1, 2 channels, 1 group, N = 4, L = 10, fp32: forward reads u, delta, z (3 x 2 x 10) and B, C
    # (2 x 4 x 10) and writes out (2 x 10); the backward reads those and d(out), writes the 5 gradients
    streams = 3 * 2 * 10 + 2 * 4 * 10
    assert scan_bytes(1, 2, 1, 4, 10, 4) == 4 * ((streams + 20) + (streams + 20 + streams))
    assert scan_bytes(2, 2, 1, 4, 10, 2) == scan_bytes(1, 2, 1, 4, 10, 4)  # twice the batch in half the bytes


def test_bandwidth_table_runs_on_any_device(capsys):
    rows = scan_bandwidth({"torch": selective_scan}, torch.device("cpu"), batch=1, warmup=0, repeats=1,
                          stages=[(4, (2, 2, 3))], d_state=4)
    assert [(r["dtype"], r["dim"]) for r in rows] == [("float32", 24), ("bfloat16", 24)]
    assert all(r["ms"] > 0 and r["gbs"] > 0 and r["forward_ms"] > 0 for r in rows)
    print_bandwidth(rows, None, "test")
    out = capsys.readouterr().out
    assert "2x2x3" in out and "no-grad fwd ms" in out


def test_layer_table_compares_every_backend_and_dtype_against_torch(capsys):
    from nnunet_segmamba.tools.scan_benchmark import backend_comparison

    rows = backend_comparison([], [1, 3], batch=1, warmup=0, repeats=1, dtypes=("fp32", "bf16"),
                              device=torch.device("cpu"), stages=[(8, (2, 2, 3))])
    assert [(r["orders"], r["dtype"]) for r in rows] == [(1, "fp32"), (1, "bf16"), (3, "fp32"), (3, "bf16")]
    assert all(r["err_out"] == r["err_dx"] == r["err_dw"] == 0 and r["ms"] > 0 for r in rows)  # torch vs itself
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + len(rows) and lines[3].split()[:5] == ["8", "2x2x3", "1", "fp32", "torch"]


def test_layer_table_times_the_compiled_layer_of_each_backend_asked_for(capsys, monkeypatch):
    from nnunet_segmamba.tools.scan_benchmark import backend_comparison

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(options) or module)  # no inductor
    rows = backend_comparison(["torch"], [3], batch=1, warmup=0, repeats=1, dtypes=("fp32",), compile=True,
                              device=torch.device("cpu"), stages=[(8, (2, 2, 3))])
    assert compiled == [{"dynamic": False}] and [r["compiled_ms"] > 0 for r in rows] == [True]
    assert "compiled ms" in capsys.readouterr().out


def test_layer_table_reports_a_layer_that_fails_to_compile_and_goes_on(capsys, monkeypatch):
    from nnunet_segmamba.tools.scan_benchmark import backend_comparison

    def failing(*args):
        raise RuntimeError("inductor")
    monkeypatch.setattr(torch, "compile", lambda module, **options: failing)
    rows = backend_comparison(["torch"], [1, 3], batch=1, warmup=0, repeats=1, dtypes=("fp32",), compile=True,
                              device=torch.device("cpu"), stages=[(8, (2, 2, 3))])
    assert [r["compiled_ms"] for r in rows] == ["error: RuntimeError"] * 2 and all(r["ms"] > 0 for r in rows)
    assert capsys.readouterr().out.count("error: RuntimeError") == 2
