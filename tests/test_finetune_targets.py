"""The fine-tuning benchmark's target check reads the results file as the issue words it: at
equal bytes AB's worst seed must beat the other's best; at equal rank AB sends at most 0.55x the
bytes, loses at most the seed spread, and holds no more state."""

from __future__ import annotations

from benchmarks.finetune_markdown import markdown_targets
from benchmarks.finetune_results import spread, targets


def method(losses: list[float], wire: float, state: float) -> dict:
    return {"summary": {"eval_loss": spread(losses), "wire_bytes": spread([wire]),
                        "bytes": spread([wire]), "peak_state_bytes": spread([state])}}


def test_targets_met_and_missed() -> None:
    res = {"methods": {
        "ab-residual": method([1.60, 1.61, 1.62], 50.0, 9.0),
        "lora-half": method([1.63, 1.64, 1.65], 50.0, 8.0),
        "pissa-half": method([1.615, 1.63, 1.64], 50.0, 8.0),  # overlaps AB's worst seed
        "lora": method([1.60, 1.605, 1.61], 100.0, 10.0),
    }}
    rows = {(r["ab"], r["other"], r["equal"]): r for r in targets(res)}
    assert set(rows) == {("ab-residual", "lora-half", "bytes"),
                         ("ab-residual", "pissa-half", "bytes"), ("ab-residual", "lora", "rank")}
    assert rows["ab-residual", "lora-half", "bytes"]["met"]
    assert not rows["ab-residual", "pissa-half", "bytes"]["met"]
    rank = rows["ab-residual", "lora", "rank"]
    assert rank["wire_ratio"] == 0.5 and rank["state_ratio"] == 0.9 and rank["loss_ok"]
    assert rank["met"]
    res["methods"]["ab-residual"]["summary"]["wire_bytes"] = spread([60.0])
    (rank,) = [r for r in targets(res) if r["equal"] == "rank"]
    assert not rank["met"]
    assert "no: bytes above 0.55x" in markdown_targets(res)
    assert markdown_targets({"methods": {"lora": res["methods"]["lora"]}}) == ""
