"""benchmarks/gpu_step.py, at tiny shapes on CPU: the script a GPU run will use."""

from __future__ import annotations

import json

from benchmarks import gpu_step


def test_gpu_step_script_measures_dense_and_ab_steps_and_the_switch(tmp_path):
    out = tmp_path / "gpu_step.json"
    report = gpu_step.main(["--tiny", "true", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {r["model"] for r in report["results"]} == {"vit", "resnet"}
    for r in report["results"]:
        for case in ("dense", "ab_A", "ab_B"):
            assert r[case]["ms_per_step"] > 0 and r[case]["peak_bytes"] > 0
        # an A-group step trains A (and the dense parameters) only: fewer trained parameters
        assert r["ab_A"]["trained_params"] < r["dense"]["trained_params"]
        assert r["ab_B"]["trained_params"] < r["dense"]["trained_params"]
        assert r["factorize_s"] > 0 and r["compression"]["factorized_ratio"] >= 1.0
