"""Self-repair after a one-hook ablation: what the later layers write back, against no edit and every write."""

from __future__ import annotations

import pytest
import torch

from featsteer.datasets import builtin_prompts
from featsteer.directions.repair import self_repair
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
from featsteer.models import load_model
from featsteer.testing import random_direction

pytestmark = pytest.mark.usefixtures("single_thread")
HARMFUL = list(builtin_prompts("harmful", "test"))[:6]
HARMLESS = list(builtin_prompts("harmless", "test"))[:6]


def test_every_write_keeps_the_direction_out_and_the_unedited_score_is_the_models():
    model = load_model("tiny:llama")
    r = random_direction(model.d_model)
    result = self_repair(model, r, HARMFUL, HARMLESS, at="blocks.0.hook_resid_pre")
    assert [row.hook for row in result.rows] == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    for row in result.rows:
        assert abs(row.gap_on_r["every_write"]) < 1e-4  # ablated at every write, r never enters the stream
        assert -1.0 - 1e-6 <= row.own_cosine <= 1.0 + 1e-6
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    assert result.refusal["unedited"] == pytest.approx(float(refusal_score(first_token_logprobs(model, HARMFUL), tokens).mean()), abs=1e-5)
    # at layer 0 every prompt's last token is the same template token: nothing to remove, so no repair share
    assert result.rows[0].removed == pytest.approx(0.0, abs=1e-6) and result.rows[0].repaired is None
    assert "| blocks.1.hook_resid_pre |" in result.markdown() and "| n/a |" in result.markdown()
    assert result.rows[0].repaired_text() == "n/a (the ablation removed no gap at its hook)"


def test_a_direction_of_any_length_is_ablated_as_its_unit_vector():
    """The docstring says the direction is made unit, but the ablation took it as given: 0.5 r removed only a quarter of
    r's component (`x - (x.b) b`). Now 0.5 r and r give the same result."""
    model = load_model("tiny:llama")
    r = random_direction(model.d_model)
    unit, half = (self_repair(model, d, HARMFUL, HARMLESS, at="blocks.0.hook_resid_pre").to_dict() for d in (r, 0.5 * r))
    assert half["refusal"] == pytest.approx(unit["refusal"], abs=1e-5)
    for a, b in zip(half["rows"], unit["rows"], strict=True):
        assert a["gap_on_r"] == pytest.approx(b["gap_on_r"], abs=1e-4) and abs(a["gap_on_r"]["every_write"]) < 1e-4


def test_layers_that_write_nothing_repair_nothing():
    """With every later attention and MLP output projection zeroed, the stream after the ablation hook is the stream at
    it: the removed gap stays removed (repaired 0), as with the direction ablated at every write."""
    model = load_model("tiny:llama")
    with torch.no_grad():
        for layer in model.model.model.layers[1:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    r = random_direction(model.d_model, 1)
    result = self_repair(model, r, HARMFUL, HARMLESS, at="blocks.1.hook_resid_pre")
    assert abs(result.rows[0].removed) > 1e-3
    for row in result.rows:
        assert row.gap_on_r["unedited"] == pytest.approx(row.removed, abs=1e-4)
        assert abs(row.gap_on_r["at_hook"]) < 1e-4 and row.repaired == pytest.approx(0.0, abs=1e-3)
    assert all(abs(row.gap_on_r["every_write"]) < 1e-4 for row in result.rows)


def test_bad_input_is_one_clear_line():
    model = load_model("tiny:llama")
    r = random_direction(model.d_model)
    with pytest.raises(FeatsteerError, match="not on the residual stream"):
        self_repair(model, r, HARMFUL, HARMLESS, at="blocks.0.hook_attn_out")
    with pytest.raises(FeatsteerError, match="after the last layer"):
        self_repair(model, r, HARMFUL, HARMLESS, at="blocks.2.hook_resid_post")
    with pytest.raises(FeatsteerError, match="d_model=64"):
        self_repair(model, torch.ones(5), HARMFUL, HARMLESS, at="blocks.0.hook_resid_pre")
    with pytest.raises(FeatsteerError, match="at least 2 prompts"):
        self_repair(model, r, HARMFUL[:1], HARMLESS, at="blocks.0.hook_resid_pre")


def test_the_table_writes_float_noise_below_zero_as_zero():
    from featsteer.directions.repair import _two_places

    assert (_two_places(-0.003), _two_places(-0.006), _two_places(0.004)) == ("0.00", "-0.01", "0.00")


def test_a_share_of_a_tiny_removed_gap_is_not_reported():
    """Removing a gap of 0.05 where the later unedited gap is 12 made `repaired` (4.0 - 11.95) / 0.05 = -159: the share
    of a small number reads the large gaps' noise many times over. It is None (n/a, with the reason) below a tenth."""
    import json

    from featsteer.directions.repair import MIN_REMOVED_SHARE, RepairRow, SelfRepair

    gaps_own = {"unedited": 20.0, "at_hook": 18.0, "every_write": 5.0}
    tiny = RepairRow("blocks.5.hook_resid_pre", 0.5, {"unedited": 12.0, "at_hook": 4.0, "every_write": 0.0}, gaps_own, 0.05)
    assert tiny.repaired is None and "0.05 is under 10% of the unedited gap 12.00" in tiny.repaired_note
    assert tiny.repaired_text().startswith("n/a (the removed gap 0.05")
    enough = RepairRow("blocks.5.hook_resid_pre", 0.5, {"unedited": 12.0, "at_hook": 4.0, "every_write": 0.0}, gaps_own,
                       MIN_REMOVED_SHARE * 12.0)
    assert enough.repaired == pytest.approx((4.0 - (12.0 - 1.2)) / 1.2) and enough.repaired_note is None
    assert enough.repaired_text() == f"{enough.repaired:+.2f}"
    repair = SelfRepair("blocks.4.hook_resid_pre", (tiny, enough), {"unedited": 1.0, "at_hook": 0.5, "every_write": -1.0}, 8, 8)
    table = repair.markdown()
    assert "| n/a |" in table and f"| {enough.repaired:+.2f} |" in table and "under 10% of the unedited gap" in table
    rows = json.loads(json.dumps(repair.to_dict(), allow_nan=False))["rows"]
    assert rows[0]["repaired"] is None and rows[0]["repaired_note"] == tiny.repaired_note and rows[1]["repaired_note"] is None
