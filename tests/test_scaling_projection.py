"""benchmarks/scaling_projection.py: model-state bytes against a hand count, the hours arithmetic,
the choice of the one-device rate, and the whole script at the tiny size."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling_projection as sp  # noqa: E402

TINY_DEPTHS = sp.MODELS["tiny"][0]


def test_model_states_match_a_hand_count_of_the_real_student():
    from gfm_fast.models.pretrainer import GFMStudent

    student = GFMStudent(sp.student_config(TINY_DEPTHS, 64))  # real tensors, not the meta count
    params = sum(p.numel() for p in student.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in student.modules())
    counted = sp.param_counts(TINY_DEPTHS, 64)
    assert counted == {"student": params, "largest_layer": largest}
    # 2 bytes bf16 weights + 2 bf16 grads + 4 fp32 grads + 4 fp32 master weights + 8 Adam moments.
    assert sp.model_state_bytes(0, params, largest, 8) == 20 * params
    assert sp.model_state_bytes(1, params, largest, 8) == 4 * params + 16 * params // 8
    # ZeRO-2 over 64 GPUs: bf16 weights whole, the other 18 bytes per parameter split 64 ways.
    assert sp.model_state_bytes(2, params, largest, 64) == 2 * params + int(18 * params / 64)
    assert sp.model_state_bytes(3, params, largest, 64) == 4 * largest + int(18 * params / 64)


def test_hours_arithmetic():
    rows = sp.training_hours(3000.0, {1: 1.0, 8: 0.9, 64: 0.8}, images=600_000, epochs=100)
    by_gpus = {r["gpus"]: r for r in rows}
    assert by_gpus[1]["hours"] == pytest.approx(60e6 / 3000 / 3600)  # 5.56 h
    assert by_gpus[8]["hours"] == pytest.approx(60e6 / (3000 * 8 * 0.9) / 3600)
    assert by_gpus[64]["gpu_hours"] == pytest.approx(64 * 60e6 / (3000 * 64 * 0.8) / 3600)
    assert by_gpus[64]["vs_paper_gpu_hours"] == pytest.approx(93.3 / by_gpus[64]["gpu_hours"])


def test_efficiency_parsing():
    assert sp.parse_efficiency("8=0.9,64=0.75") == {1: 1.0, 8: 0.9, 64: 0.75}
    for bad in ("8:0.9", "8=1.5", "0=0.9"):
        with pytest.raises(argparse.ArgumentTypeError, match="--efficiency"):
            sp.parse_efficiency(bad)


def _git(cwd, *args, date=None):
    env = dict(os.environ, GIT_COMMITTER_DATE=date, GIT_AUTHOR_DATE=date) if date else None
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True, env=env)


def test_rate_comes_from_the_newest_committed_gpu_result(tmp_path):
    def write(name, device_type, rate):
        record = {"case": "train_step_base", "side": "ours", "precision": "bf16", "images_per_s": rate}
        records = [record, dict(record, side="reference", images_per_s=9e9)]  # the reference side is not ours
        (tmp_path / name).write_text(json.dumps({"environment": {"device_type": device_type, "device": "GPU X"},
                                                 "records": records}))

    _git(tmp_path, "init", "-q")
    assert sp.committed_gpu_rate(tmp_path) is None
    write("cpu.json", "cpu", 5.0)
    # The newest commit wins, not the last name nor the fastest rate.
    write("a_newer_throughput.json", "cuda", 1000.0)
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "newer", date="2024-01-01T00:00:00")
    write("z_older_throughput.json", "cuda", 2000.0)
    _git(tmp_path, "add", "z_older_throughput.json")
    _git(tmp_path, "commit", "-q", "-m", "older", date="2020-01-01T00:00:00")
    write("uncommitted_throughput.json", "cuda", 4000.0)  # not committed: not a result yet
    rate, source = sp.committed_gpu_rate(tmp_path)
    assert rate == 1000.0 and "a_newer_throughput.json" in source


def test_script_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "projection.json"
    assert sp.main(["--model", "tiny", "--images-per-s", "1000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PROJECTION, NOT A MEASUREMENT" in printed
    data = json.loads(out.read_text())
    assert data["projection"] is True and data["assumptions"]["rate_source"] == "given on the command line"
    act = {(r["width"], r["precision"]): r["bytes_per_image"] for r in data["activation_per_image"]}
    for width in (32, 64):  # bf16 activations are smaller than fp32 ones, and a wider student needs more
        assert 0 < act[width, "bf16"] < act[width, "fp32"]
    assert act[64, "fp32"] > act[32, "fp32"]
    hours = {r["gpus"]: r["hours"] for r in data["hours"]}
    assert hours[64] == pytest.approx(60e6 / (1000 * 64 * 0.8) / 3600)
    widths = lambda cell: 0 if cell == "none" else int(cell.split()[0].rstrip("+"))  # noqa: E731
    for row in data["largest_student"]:  # more partitioning never fits a smaller student
        fits = [widths(row[f"zero{s}"]) for s in range(4)]
        assert fits == sorted(fits)
        if row["gpus"] == 1:  # nothing to partition over: stages 0-2 hold the same bytes
            assert fits[0] == fits[1] == fits[2]


def test_activations_are_measured_on_the_gpu_paths_not_this_cpus():
    """The measured student runs explicit attention (an upper bound of CUDA's SDPA, which keeps no
    attention probabilities) and torch's bf16 GEMM, whatever `auto` picks on the CPU measuring it."""
    from gfm_fast.models.pretrainer import GFMStudent

    cfg = sp.student_config(TINY_DEPTHS, 32)
    assert cfg.attention_path == "explicit" and cfg.bf16_matmul == "native"
    student = GFMStudent(cfg)
    cpp = GFMStudent(dataclasses.replace(cfg, attention="cpp"))
    cpp.load_state_dict(student.state_dict())
    images, mask = torch.randn(1, 3, 192, 192), torch.rand(1, 6, 6) < 0.6
    z_t = torch.randn(1, cfg.teacher.num_features)
    saved = {}
    for name, model in (("explicit", student), ("cpp", cpp)):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            model(images, mask, z_t).loss.backward()
        saved[name] = shapes
    # the attention probabilities (windows, heads, 36, 36) are saved on the measured path only
    assert any(s[-2:] == (36, 36) for s in saved["explicit"]) and not any(s[-2:] == (36, 36) for s in saved["cpp"])
