"""The Live tab's beta_i histogram: the run's `score/beta_hist.png` as an image, nothing before the score
stage wrote it, and nothing for a name outside the runs root.

    python -m pytest tests/test_ui_beta_hist.py -q
"""
from __future__ import annotations

from mmrlhf_lite.evaluate.margins import write_beta_histogram
from mmrlhf_lite.ui.base import UIConfig
from mmrlhf_lite.ui.tabs.live import LiveHandlers


def test_beta_histogram_handler(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    h = LiveHandlers(UIConfig(data_root=tmp_path, runs_root=runs, recipes_root=tmp_path, upload_dir=tmp_path,
                              max_upload_bytes=1 << 20))
    assert h.beta_histogram("a") is None and h.beta_histogram(None) is None
    write_beta_histogram(runs / "a" / "score" / "beta_hist.png", [0.0, 1.0, -1.0, 2.0], 0.1, 0.1, 0.5, 1e-3)
    img = h.beta_histogram("a")
    assert img is not None and img.size[0] > 100
    (tmp_path / "score").mkdir()
    write_beta_histogram(tmp_path / "score" / "beta_hist.png", [0.0], 0.1, 0.1, 0.5, 1e-3)
    assert h.beta_histogram("..") is None and h.beta_histogram("../runs/a/..") is None
