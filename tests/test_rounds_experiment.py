"""The experiment table of docs/rounds.md from finished seeds: `--merge` of two runs' results.json (the tasks run
side by side), mean ± sd over the seeds worked by hand.

    python -m pytest -q tests/test_rounds_experiment.py
"""
from __future__ import annotations

import json

from mmrlhf_lite.rounds.experiment import main


def seed_result(seed: int, right: list[float], labelled: float, everything: float, ranker: float | None = None) -> dict:
    held = lambda x: {"right_answers": x, "well_formed": 1.0, "reward_rank": 2.0, "implicit_accuracy": 0.75}
    sampled = {"right_answers": 0.5, "well_formed": 1.0, "kl_to_initial": 0.0}
    if ranker is not None:   # results of a build before the ranker check have no such keys
        sampled.update(ranker_right=ranker, ranker_pairs=10, best_right=1.0, best_prompts=4)
    return {"rounds": [held(x) for x in right], "sampled": [None] + [sampled] * (len(right) - 1),
            "dropped": [None] + [{"degenerate": 1, "tied": 0}] * (len(right) - 1),
            "steps": [600] + [40] * (len(right) - 1), "total_steps": 600 + 40 * (len(right) - 1), "guard": None,
            "labelled": held(labelled), "all": held(everything), "reward_model_acc": 0.8,
            "seconds": {"rounds": 600.0, "labelled": 60.0, "all": 120.0}, "seed": seed}


def test_merge_writes_the_table_of_the_seeds_that_finished(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"shapes": [seed_result(1, [0.4, 0.6], 0.5, 0.9, 0.6)]}))
    (tmp_path / "b" / "results.json").write_text(json.dumps({"shapes": [seed_result(0, [0.2, 0.4], 0.7, 0.7, 0.8)],
                                                             "majority": [seed_result(0, [0.3, 0.3], 0.3, 0.3)]}))
    assert main(["--out", str(tmp_path / "out"), "--merge", f"{tmp_path / 'a'},{tmp_path / 'b'}"]) == 0
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    # round 1: 0.4 and 0.6 -> mean 0.5, sd sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert "| after round 1, 640 steps | 50.0 ± 14.1% | 100.0 ± 0.0% | 2.00 ± 0.00 | 75.0 ± 0.0% |" in lines
    assert "| offline (a): labelled share only, 640 steps | 60.0 ± 14.1% | 100.0 ± 0.0% | 2.00 ± 0.00 | 75.0 ± 0.0% |" in lines
    assert "| offline (b): all human-ranked training groups, 640 steps | 80.0 ± 14.1% | 100.0 ± 0.0% | 2.00 ± 0.00 | " \
           "75.0 ± 0.0% |" in lines
    # the ranker check: 0.6 and 0.8 -> 70.0 ± 14.1%; majority's seed has none recorded
    checks = [x for x in lines if x.startswith("The reward model on each round's samples")]
    assert checks[0].endswith("round 1: 70.0 ± 14.1% / 100.0 ± 0.0%.") and checks[1].endswith("round 1: - / -."), checks
    assert lines[-1] == "Seeds: shapes 0, 1; majority 0. Training time per task and seed (all three runs): 13-13 min."
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())) == {"shapes", "majority"}
    # a folder without results: a sentence, not a traceback
    assert main(["--out", str(tmp_path / "out"), "--merge", str(tmp_path / "none")]) == 2
    assert "results.json not found" in capsys.readouterr().err
