"""run.eval_every / run.eval_data: training logs the student's k-NN top-1 on a labelled folder."""
from pathlib import Path

import pytest

import gfm_fast
from gfm_fast.errors import GFMError
from train_helpers import metric, run_tiny

SITES = Path(gfm_fast.__file__).parent / "data" / "sample" / "images" / "neon_sites"  # 3 site folders = classes


def test_knn_top1_is_logged_every_n_steps(tmp_path):
    result = run_tiny(tmp_path, "run.max_steps=4", "run.log_every=3", "run.eval_every=2", f"run.eval_data={SITES}")
    top1 = metric(tmp_path, "eval/knn_top1")
    assert sorted(top1) == [2, 4]  # evaluation steps are logged even between log steps
    assert all(0.0 <= v <= 1.0 for v in top1.values())
    assert result.metrics["eval/knn_top1"] == top1[4]
    assert sorted(metric(tmp_path, "loss/total")) == [2, 3, 4]


def test_a_bad_eval_folder_fails_before_training(tmp_path):
    (tmp_path / "data" / "only_class").mkdir(parents=True)
    with pytest.raises(GFMError, match=r"^run.eval_data \(the k-NN set of run.eval_every\): .* no labelled images"):
        run_tiny(tmp_path / "run", "run.max_steps=2", "run.eval_every=1", f"run.eval_data={tmp_path / 'data'}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
