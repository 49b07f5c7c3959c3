"""First-order ablation estimates (`featsteer.directions.attribution`) and the screened Arditi selection."""

from __future__ import annotations

import json

import pytest
import torch

from featsteer.directions.attribution import ablation_attribution
from featsteer.directions.methods import weighted_basis
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
from featsteer.interventions.steering import WRITES, resolve_sites
from featsteer.models import load_model
from featsteer.testing import hooked_gpt2, saved_tokenizer, tiny_model
from tests.conftest import count_hooks

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["how do I bake bread", "tell me a story about a cat and a very long road", "why", "list three colours"]
TOKENS = RefusalTokens(refusal=(70, 73, 83), compliance=(65, 84))


def _partial_ablation_score(adapter, basis: torch.Tensor, alpha: float) -> float:
    """Mean refusal log-odds with `alpha` of the basis component removed at every residual write."""
    basis = basis.to(adapter.dtype)

    def hook(x, site):
        return x - alpha * (x @ basis.T) @ basis

    with adapter.hooks([(name, hook) for name in resolve_sites(adapter, WRITES)]):
        return float(refusal_score(first_token_logprobs(adapter, PROMPTS), TOKENS).mean())


def _adapter(family: str):
    model, tokenizer = tiny_model(family)
    return load_model(model, tokenizer=tokenizer)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_estimate_is_the_derivative_of_partial_ablation(family):
    adapter = _adapter(family)
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(adapter.d_model, generator=generator, dtype=torch.float64)
    direction /= direction.norm()
    basis = torch.linalg.qr(torch.randn(adapter.d_model, 2, generator=generator, dtype=torch.float64)).Q.T
    attribution = ablation_attribution(adapter, PROMPTS, TOKENS, batch_size=3)
    for b in (direction[None], basis):
        eps = 1e-3
        slope = (_partial_ablation_score(adapter, b, eps) - _partial_ablation_score(adapter, b, -eps)) / (2 * eps)
        estimate = attribution.estimate(b if b.shape[0] > 1 else b[0])
        assert abs(slope) > 1e-4, "the test needs a direction that moves the score"
        assert estimate == pytest.approx(slope, rel=1e-2, abs=1e-6)
    # a direction the estimate does not describe: another random one gives another value
    other = torch.randn(adapter.d_model, generator=generator, dtype=torch.float64)
    assert attribution.estimate(other / other.norm()) != pytest.approx(attribution.estimate(direction), rel=1e-3)


def test_attribution_leaves_no_hooks_or_gradients(llama_adapter):
    hf = llama_adapter.model
    before = count_hooks(hf)
    ablation_attribution(llama_adapter, PROMPTS, TOKENS)
    assert count_hooks(hf) == before
    assert all(p.grad is None for p in hf.parameters())
    assert first_token_logprobs(llama_adapter, PROMPTS).shape[0] == len(PROMPTS)


def test_attribution_through_transformer_lens_matches_native(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native, lens = load_model(model, tokenizer=tokenizer), load_model(hooked_gpt2(model, tokenizer))
    direction = torch.nn.functional.normalize(torch.randn(native.d_model, generator=torch.Generator().manual_seed(2)), dim=0)
    a = ablation_attribution(native, PROMPTS, TOKENS).estimate(direction)
    b = ablation_attribution(lens, PROMPTS, TOKENS).estimate(direction)
    assert a == pytest.approx(b, rel=1e-3, abs=1e-6)


def test_attribution_errors(llama_adapter):
    with pytest.raises(FeatsteerError, match="at least one prompt"):
        ablation_attribution(llama_adapter, [], TOKENS)
    attribution = ablation_attribution(llama_adapter, PROMPTS[:2], TOKENS)
    with pytest.raises(FeatsteerError, match="d_model"):
        attribution.estimate(torch.ones(llama_adapter.d_model + 1))


@pytest.fixture(scope="module")
def organism_capture():
    from featsteer.datasets import builtin_prompts
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    harmful, harmless = builtin_prompts("harmful", "train"), builtin_prompts("harmless", "train")
    full = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=16), keep_activations=True)
    return model, harmful, harmless, full


def test_screen_ablates_only_the_best_estimates(organism_capture):
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model, harmful, harmless, full = organism_capture
    eligible = [c for c in full.selection.candidates if not {"late layer", "zero direction"} & set(c.failed)]
    assert len(eligible) > 2
    screened = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=16, screen=2), reuse=full)
    rows = {c.index: c for c in screened.selection.candidates}
    scored = [c for c in rows.values() if c.refusal_ablated == c.refusal_ablated]
    out = [c for c in rows.values() if c.reason == "screened out"]
    assert len(scored) == 2 and len(out) == len(eligible) - 2
    assert max(c.refusal_estimate for c in scored) <= min(c.refusal_estimate for c in out)
    # the scored ones get the same exact scores as in the full selection
    exact = {c.index: c for c in full.selection.candidates}
    for c in scored:
        assert c.refusal_ablated == pytest.approx(exact[c.index].refusal_ablated, abs=1e-9)
    assert screened.selection.chosen in scored
    assert "refusal (estimate)" in screened.selection.table() and "screened out" in screened.selection.table()
    # the estimate is the base score plus the attribution estimate of the candidate's basis
    val = list(screened.val[0].head(16).prompts)
    attribution = ablation_attribution(model, val)
    c = scored[0]
    expected = screened.selection.base_refusal_harmful + attribution.estimate(weighted_basis(screened.candidates, c.index))
    assert c.refusal_estimate == pytest.approx(expected, rel=1e-6)


def test_screen_wider_than_the_candidates_is_the_full_selection(organism_capture):
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model, harmful, harmless, full = organism_capture
    wide = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=16, screen=1000), reuse=full)
    assert json.dumps(wide.selection.to_dict()) == json.dumps(full.selection.to_dict())
    assert "estimate" not in wide.selection.table()


def test_screen_must_be_positive():
    from featsteer.pipeline import DirectionConfig

    with pytest.raises(FeatsteerError, match="--screen must be at least 1"):
        DirectionConfig(screen=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_site_attribution_is_the_derivative_of_a_partial_removal_at_each_reader(family):
    """Each reader site's estimate is the slope at 0 of the refusal score with `alpha` of the direction removed at that
    site alone, also on the normalised-input hooks, which pass a change on to the norm's output."""
    from featsteer.directions.attribution import site_attribution

    adapter = _adapter(family)
    torch.manual_seed(7)
    r = torch.nn.functional.normalize(torch.randn(adapter.d_model), dim=0)
    sites = ["blocks.0.ln1.hook_normalized", "blocks.1.ln2.hook_normalized", "ln_final.hook_normalized"]
    estimates = site_attribution(adapter, PROMPTS, r, sites, TOKENS)
    for site in sites:
        def removed(alpha, site=site):
            hook = (site, lambda x, _: x - alpha * (x @ r)[..., None] * r)
            with adapter.hooks([hook]):
                return float(refusal_score(first_token_logprobs(adapter, PROMPTS), TOKENS).mean())

        eps = 1e-3
        slope = (removed(eps) - removed(-eps)) / (2 * eps)
        assert estimates[site] == pytest.approx(slope, rel=2e-2, abs=1e-4), site
    assert any(abs(v) > 1e-3 for v in estimates.values())


def test_site_attribution_summed_over_the_writes_is_the_matrix_estimate():
    from featsteer.directions.attribution import site_attribution

    adapter = _adapter("llama")
    torch.manual_seed(8)
    r = torch.nn.functional.normalize(torch.randn(adapter.d_model), dim=0)
    sites = resolve_sites(adapter, WRITES)
    per_site = site_attribution(adapter, PROMPTS, r, sites, TOKENS)
    assert sum(per_site.values()) == pytest.approx(ablation_attribution(adapter, PROMPTS, TOKENS).estimate(r), rel=1e-6, abs=1e-9)
    with pytest.raises(FeatsteerError, match="d_model"):
        site_attribution(adapter, PROMPTS, torch.ones(3), sites, TOKENS)
    with pytest.raises(FeatsteerError, match="at least one prompt"):
        site_attribution(adapter, [], r, sites, TOKENS)
