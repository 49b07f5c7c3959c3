"""Self-repair after a one-hook ablation: what the later layers write back, against no edit and every write."""

from __future__ import annotations

import math

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
    assert result.rows[0].removed == pytest.approx(0.0, abs=1e-6) and math.isnan(result.rows[0].repaired)
    assert "| blocks.1.hook_resid_pre |" in result.markdown() and "| - |" in result.markdown()


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
