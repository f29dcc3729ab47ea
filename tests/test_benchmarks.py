"""The benchmark commands a user runs (`python benchmarks/throughput.py`, `benchmarks/ops_bench.py`)
work end to end at the smallest sizes and write the JSON they promise. Their numbers are
measurements, not asserted here (speed targets live in the benchmarks, never in tests); what is
checked is that every case ran, timed something, and is compared with the reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gfm_fast.ops.widened_linear import cpu_has_bf16_matmul

REPO = Path(__file__).resolve().parent.parent


def _run_benchmark(script: str, *args: str) -> None:
    # Without the Triton interpreter: the CPU benchmarks time the backends that really serve the CPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "wrote" in result.stdout, result.stdout[-2000:]


def _timed(record) -> bool:
    return record["median_ms"] > 0 and record["images_per_s"] > 0


def test_throughput_step_times_ours_against_the_reference_at_each_precision(tmp_path):
    out = tmp_path / "step.json"
    _run_benchmark("throughput.py", "--only", "step", "--model", "tiny", "--batch", "2", "--runs", "1", "--warmup",
                   "0", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["environment"]["device_type"] == "cpu"
    steps = {(r["side"], r["precision"]): r for r in result["records"] if r["case"] == "train_step_tiny"}
    sides = ("reference", "ours", "ours+fused_adamw")
    expected = [(side, p) for side in sides for p in ("fp32", "bf16")] + [("ours+fused_adamw+precision=bf16", "bf16")]
    if not cpu_has_bf16_matmul():  # the widened bf16 GEMM's worth: the default with torch's instead
        expected.append(("ours+fused_adamw+bf16_matmul=native", "bf16"))
    assert sorted(steps) == sorted(expected)
    for (side, precision), r in steps.items():
        assert _timed(r) and r["batch"] == 2 and r["runs"] == 1
        assert r["flops_per_image"] > 1e9  # tiny student fwd+bwd + tiny teacher fwd at 192/224 px
        assert 0 < r["mfu"] < 1.5 and r["matmul_GFLOPs"] > 0 and r["copy_calls"] > 0
        top = r["top_cpu_ops"]  # where the time went, most first
        assert 0 < len(top) <= 12 and all(a["ms"] >= b["ms"] > 0 for a, b in zip(top, top[1:]))
        assert r["speedup"] == 1.0 if side == "reference" else r["speedup"] > 0
    # One FLOP count for every side: the model FLOPs, counted on the reference step.
    assert len({r["flops_per_image"] for r in steps.values()}) == 1
    # Our default step reads the host once (the skip decision and the stop flag together); torch's
    # unfused AdamW, which the reference and "ours" share, reads each parameter's step count, and
    # DeepSpeed's bf16 at ZeRO-0 (so not run.precision=auto's choice) each parameter's gradient.
    for side, precision in steps:
        if side.startswith("ours+fused_adamw") and side != "ours+fused_adamw+precision=bf16":
            assert steps[side, precision]["host_syncs"] == 1
    for side, precision in [("reference", "fp32"), ("reference", "bf16"), ("ours+fused_adamw+precision=bf16", "bf16")]:
        assert steps[side, precision]["host_syncs"] > 100
    assert (tmp_path / "step.png").stat().st_size > 10_000
    # A later phase adds its group to the same JSON (gpu_session.sh: eager first, compiled later).
    _run_benchmark("throughput.py", "--only", "step", "--model", "tiny", "--batch", "2", "--runs", "1", "--warmup",
                   "0", "--precision", "fp32", "--out", str(out), "--append")
    again = json.loads(out.read_text())["records"]
    assert again[:len(result["records"])] == result["records"]
    assert [(r["side"], r["precision"]) for r in again[len(result["records"]):]] == [
        (side, "fp32") for side in sides]


def test_ops_bench_covers_every_op_mode_and_baseline(tmp_path):
    out = tmp_path / "ops.json"
    _run_benchmark("ops_bench.py", "--batch", "1", "--runs", "1", "--warmup", "0", "--out", str(out))
    result = json.loads(out.read_text())
    cases = {(r["case"], r["backend"], r["mode"]) for r in result["records"]}
    backends = {"masked_patch_embed": {"reference", "cpp", "torch_gemm_where"},
                "decoder_l1_loss": {"reference", "cpp", "torch_masked_blocks", "gemm_floor"},
                "cosine_distillation": {"reference", "cpp"}}
    for op, names in backends.items():
        for backend in names:
            for mode in ("forward", "backward", "full"):
                assert (op, backend, mode) in cases, (op, backend, mode)
    assert all(_timed(r) for r in result["records"])
    assert all(r["speedup"] == 1.0 for r in result["records"] if r["backend"] == "reference")
    assert set(result["fastest_fused"]) == set(backends)


def test_step_results_are_saved_as_each_group_ends(tmp_path, monkeypatch):
    """A GPU session stops the step benchmark at its deadline: the eager records written before
    torch.compile starts must already be in the JSON, then the compiled ones join them."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import step_bench

    groups = []

    def fake_group(size, batch, precision, device, warmup, runs, compile_mode, checkpoint_stages=()):
        groups.append((precision, compile_mode, checkpoint_stages))
        side = "ours" + ("+compile" if compile_mode else "")
        return [{"section": "step", "case": f"train_step_{size}", "side": side, "precision": precision,
                 "batch": batch, "median_ms": 10.0, "images_per_s": 100.0, "speedup": 1.0, "mfu": 0.5}]

    monkeypatch.setattr(step_bench, "bench_precision", fake_group)
    out = tmp_path / "step.json"
    saved = []

    def save(so_far):
        step_bench.save_results(out, {"device": "test"}, so_far)
        saved.append([r["side"] for r in json.loads(out.read_text())["records"]])

    step_bench.run_step(torch.device("cpu"), "tiny", 2, ["bf16"], 0, 1, ("eager", "compile"), checkpoint_stages=(2,),
                        on_records=save)
    assert saved == [["ours"], ["ours", "ours+compile"]]
    assert groups == [("bf16", False, (2,)), ("bf16", True, ())]  # checkpointing is an eager-only variant
    assert out.with_suffix(".png").stat().st_size > 10_000 and not list(tmp_path.glob("*.partial"))
    assert step_bench.step_modes(compile_=False, compiled_only=True) == ("compile",)
    groups.clear()
    step_bench.run_step(torch.device("cpu"), "tiny", 2, ["bf16"], 0, 1, ("compile",))
    assert groups == [("bf16", True, ())]


def test_where_time_goes_counts_gpu_kernels_once(monkeypatch):
    """On CUDA a CPU op's profiler entry also carries the time of the kernels it launched: the GPU's
    busy time and top kernels come from the kernel entries alone."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_bench import where_time_goes

    def entry(key, device_type, cpu_us, device_us, count=1):
        return SimpleNamespace(key=key, device_type=device_type, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us, count=count)

    averages = [entry("aten::mm", DeviceType.CPU, 50, 3000, 2), entry("cudaLaunchKernel", DeviceType.CPU, 20, 0, 5),
                entry("sm90_gemm", DeviceType.CUDA, 0, 3000, 2), entry("softmax_kernel", DeviceType.CUDA, 0, 500, 3),
                entry("cuLaunchKernelEx", DeviceType.CPU, 4, 0, 1)]
    got = where_time_goes(averages, torch.device("cuda"))
    assert got["gpu_busy_ms"] == 3.5 and got["kernel_launches"] == 6
    assert [k["name"] for k in got["top_gpu_kernels"]] == ["sm90_gemm", "softmax_kernel"]
    assert [op["name"] for op in got["top_cpu_ops"]] == ["aten::mm", "cudaLaunchKernel", "cuLaunchKernelEx"]
    assert "gpu_busy_ms" not in where_time_goes(averages, torch.device("cpu"))


def test_features_bench_compares_extract_features_with_plain_timm(tmp_path):
    out = tmp_path / "features.json"
    _run_benchmark("throughput.py", "--only", "features", "--model", "tiny", "--features-batch", "2", "--runs", "1",
                   "--warmup", "0", "--out", str(out))
    records = json.loads(out.read_text())["records"]
    assert sorted((r["side"], r["precision"]) for r in records) == sorted(
        (side, p) for side in ("timm", "ours") for p in ("fp32", "bf16"))
    for r in records:
        assert r["section"] == "features" and _timed(r) and r["batch"] == 2
        assert r["speedup"] == 1.0 if r["side"] == "timm" else r["speedup"] > 0
        assert r["flops_per_image"] > 1e8 and 0 < r["mfu"] < 1.5  # a tiny Swin forward at 192 px
        # the same features: fp32 to rounding, bf16 to bf16's precision
        assert r["max_rel_diff"] < (1e-5 if r["precision"] == "fp32" else 5e-2), r


def test_bad_benchmark_arguments_are_one_usage_line(monkeypatch, capsys):
    """A value no run can use (no timed rounds, a zero batch, a GPU that is not there, a stage the
    model lacks) stops the command at once with argparse's one-line error, before a model is built."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import features_bench
    import loader_bench
    import ops_bench
    import scaling_projection
    import step_bench
    import throughput

    cases = [(step_bench, ["--device", "xyz"], "device 'xyz' is not a device name"),
             (step_bench, ["--batch", "0"], "--batch: must be >= 1, got 0"),
             (step_bench, ["--runs", "0"], "--runs: must be >= 1"),
             (step_bench, ["--warmup", "-1"], "--warmup: must be >= 0"),
             (step_bench, ["--model", "tiny", "--checkpoint-stages", "4"], "the tiny model has stages 0 to 3"),
             (throughput, ["--batch", "two"], "--batch: expected an integer, got 'two'"),
             (throughput, ["--runs", "0"], "--runs: must be >= 1"),
             (throughput, ["--append", "--out", str(REPO / "README.md")], "README.md is not a benchmark JSON"),
             (throughput, ["--append", "--only", "ops"], "--append adds to the JSON of --out: give --out FILE"),
             (features_bench, ["--batch", "-1"], "--batch: must be >= 1"),
             (ops_bench, ["--runs", "0"], "--runs: must be >= 1"),
             (loader_bench, ["--workers", "-1"], "--workers: must be >= 0"),
             (scaling_projection, ["--usable", "1.5"], "--usable: must lie in (0, 1]"),
             (scaling_projection, ["--images-per-s", "0"], "--images-per-s: must be > 0")]
    if not torch.cuda.is_available():
        cases.append((throughput, ["--device", "cuda"], "device 'cuda' is not available: this machine has no CUDA device; use 'cpu'"))
    for module, argv, message in cases:
        try:
            module.main(argv)
        except SystemExit as stop:
            assert stop.code == 2, (module.__name__, argv)
        else:
            raise AssertionError(f"{module.__name__} {argv} ran")
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in error, error  # argparse's own line
        assert message in error, error


def test_throughput_prints_each_section_in_its_own_columns(monkeypatch, capsys):
    """The ops and loader tables name each row's backend / image set and loader, with no column
    that is '-' on every row; --runs sets the loader's timed rounds too."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import loader_bench
    import ops_bench
    import throughput

    ops_record = {"case": "cosine_distillation", "backend": "cpp", "mode": "full", "batch": 1, "dtype": "float32",
                  "median_ms": 0.2, "p20_ms": 0.1, "p80_ms": 0.3, "images_per_s": 5000.0, "peak_bytes": 1024,
                  "speedup": 1.6}
    loader_record = {"case": "loader", "image_set": "jpeg256", "impl": "gfm_fast", "workers": 0, "median_ms": 4.5,
                     "p20_ms": 4.4, "p80_ms": 4.6, "img_s": 880.0, "img_s_per_core": 880.0,
                     "speedup_vs_imagefolder": 1.8, "batch_dtype": "uint8", "batch_bytes": 2 ** 20}
    rounds = []
    monkeypatch.setattr(ops_bench, "run_ops", lambda **kwargs: [dict(ops_record)])
    monkeypatch.setattr(loader_bench, "run_loader", lambda rounds=5: rounds_seen(rounds))

    def rounds_seen(n):
        rounds.append(n)
        return [dict(loader_record)]

    assert throughput.main(["--only", "ops", "--only", "loader", "--runs", "2", "--device", "cpu"]) == 0
    assert rounds == [2]
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    ops_header, ops_row = lines[0], lines[1]
    assert ops_row[:2] == ["cosine_distillation", "cpp"] and "img_s" not in ops_header
    assert "bandwidth_fraction" not in ops_header and len(ops_row) == len(ops_header)  # no all-'-' column
    columns = {name: ops_row[i] for i, name in enumerate(ops_header) if i < len(ops_row)}
    assert columns["images_per_s"] == "5e+03" and columns["speedup"] == "1.6"
    loader_row = lines[3]
    assert loader_row[:4] == ["loader", "jpeg256", "gfm_fast", "0"] and "880" in loader_row
