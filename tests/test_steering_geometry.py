"""Affine concept editing (ACE) and angular steering: the operations, the interventions, the directions they read,
and the comparison methods built on them."""

from __future__ import annotations

import math

import pytest
import torch

from featsteer.compare import SteeringMethodConfig, compare, gentlest_within, weakest_within
from featsteer.datasets import builtin_prompts
from featsteer.directions import DirectionSet, rotation_plane
from featsteer.errors import FeatsteerError
from featsteer.evaluation.behaviour import GenerationConfig
from featsteer.interventions import (
    NORMS,
    Ablate,
    AddDirection,
    AffineEdit,
    AngularSteer,
    ConditionalSteer,
    ProjectionSet,
    rotate_in_plane,
    steer,
)
from featsteer.models import load_model
from featsteer.pipeline import DirectionConfig, find_refusal_direction


def _plane(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.contiguous()


def test_rotation_keeps_the_norm_and_sets_the_in_plane_angle():
    plane = _plane(16)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for degrees in (0.0, 37.0, 135.0, 180.0, 290.0):
        y = rotate_in_plane(x, plane, degrees)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-10)
        complement = torch.eye(16, dtype=torch.float64) - plane.T @ plane
        assert torch.allclose(y @ complement, x @ complement, atol=1e-10)  # only the plane moves
        coords = y @ plane.T
        direction = coords / coords.norm(dim=-1, keepdim=True)  # unit vector of the in-plane part: (cos, sin) of its angle
        expected = torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))], dtype=torch.float64)
        assert torch.allclose(direction, expected.expand_as(direction), atol=1e-8)
        assert torch.allclose(coords.norm(dim=-1), (x @ plane.T).norm(dim=-1), atol=1e-10)


def test_rotation_equals_a_givens_rotation_by_the_missing_angle():
    # an independent construction: rotate each row in the plane by (target - current angle) with a rotation matrix
    plane = _plane(8, seed=3)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = math.radians(100.0)
    coords = x @ plane.T
    rows = []
    for row, (c1, c2) in zip(x, coords.tolist(), strict=True):
        turn = target - math.atan2(c2, c1)
        givens = torch.tensor([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]], dtype=torch.float64)
        rotation = torch.eye(8, dtype=torch.float64) + plane.T @ (givens - torch.eye(2, dtype=torch.float64)) @ plane
        rows.append(rotation @ row)
    assert torch.allclose(rotate_in_plane(x, plane, 100.0), torch.stack(rows), atol=1e-10)


def test_adaptive_rotation_leaves_activations_that_lean_away_alone():
    plane = _plane(8)
    x = torch.stack([2 * plane[0] + plane[1], -2 * plane[0] + plane[1]])
    y = rotate_in_plane(x, plane, 180.0, only_positive=True)
    assert torch.allclose(y[1], x[1]) and float(y[0] @ plane[0]) == pytest.approx(-math.sqrt(5), abs=1e-9)


def test_affine_edit_is_ablation_measured_from_the_harmless_mean():
    model = load_model("tiny:llama")
    d = model.d_model
    r = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)]
    harmless = {hook: 0.5 * (i + 1) for i, hook in enumerate(hooks)}
    harmful = {hook: 3.0 + i for i, hook in enumerate(hooks)}
    x = torch.randn(2, 4, d, generator=torch.Generator().manual_seed(1))
    for alpha in (0.0, -0.5, 1.0):
        edit = AffineEdit(r, harmless, harmful, alpha)
        for (name, fn), hook in zip(edit.hooks_for(model), hooks, strict=True):
            y = fn(x, None)
            target = harmless[hook] + alpha * (harmful[hook] - harmless[hook])
            assert name == hook and torch.allclose(y @ r, torch.full((2, 4), target), atol=1e-5)
            # ACE's definition: x - r r^T (x - mu) + alpha (harmful - harmless) r, with mu any point projecting to the reference
            mu = harmless[hook] * r
            assert torch.allclose(y, x - (x - mu) @ r[:, None] * r + alpha * (harmful[hook] - harmless[hook]) * r, atol=1e-5)
    # with a zero reference and alpha 0 it is plain directional ablation at those hooks
    zero = AffineEdit(r, dict.fromkeys(hooks, 0.0), dict.fromkeys(hooks, 1.0))
    ablated = Ablate(r, where=hooks)
    for (_, a), (_, b) in zip(zero.hooks_for(model), ablated.hooks_for(model), strict=True):
        assert torch.allclose(a(x, None), b(x, None), atol=1e-6)
    with pytest.raises(FeatsteerError, match="same, non-empty set of hooks"):
        AffineEdit(r, harmless, {hooks[0]: 1.0})


def test_angular_steer_checks_its_plane_and_cleans_up():
    model = load_model("tiny:llama")
    with pytest.raises(FeatsteerError, match=r"\(2, d_model\) plane"):
        AngularSteer(torch.randn(3, model.d_model), 90.0)
    with pytest.raises(FeatsteerError, match="orthonormal"):
        AngularSteer(torch.randn(2, model.d_model), 90.0)
    batch = model.tokenize(["hello there", "how do I bake bread?"])
    before = model.run(batch).clone()
    plane = _plane(model.d_model).float()
    with steer(model, AngularSteer(plane, 180.0, adaptive=False)):
        turned = model.run(batch)
    after = model.run(batch)
    assert not torch.allclose(turned, before) and torch.equal(after, before)


def test_rotation_plane_is_orthonormal_and_spanned_by_the_layer_directions():
    bases = torch.nn.functional.normalize(torch.randn(5, 1, 12, generator=torch.Generator().manual_seed(2)), dim=-1)
    directions = DirectionSet(bases, tuple(f"blocks.{i}.hook_resid_pre" for i in range(5)), (-1,) * 5, "dim")
    plane = rotation_plane(directions, 2).double()
    assert torch.allclose(plane @ plane.T, torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(plane[0], bases[2, 0].double(), atol=1e-6)
    span = torch.linalg.qr(bases[:, 0].double().T)[0]  # the second axis lies in the span of the candidates
    assert torch.allclose(span @ (span.T @ plane[1]), plane[1], atol=1e-6)
    parallel = DirectionSet(bases[2:3].repeat(3, 1, 1), ("a", "b", "c"), (-1,) * 3, "dim")
    with pytest.raises(FeatsteerError, match="no second axis"):
        rotation_plane(parallel, 0)


@pytest.fixture(scope="module")
def prompts():
    return builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16)


def test_chosen_direction_records_the_affine_references_and_rotation_axis(prompts):
    model = load_model("tiny:llama")
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4), keep_activations=True)
    harmless, harmful = result.affine_references()
    index = result.selection.chosen.index
    r, position = result.candidates.bases[index, 0].double(), result.candidates.positions[index]
    acts = result.activations[1]
    hook = acts.hook_names[1]
    rows = acts.activations[:, acts.hook_names.index(hook)][acts.position == position].double()
    assert harmless[hook] == pytest.approx(float(rows.mean(0) @ r), rel=1e-6)
    assert set(harmless) == set(harmful) == set(acts.hook_names)
    provenance = result.chosen.provenance
    assert provenance["ace"]["harmless"] == harmless and len(provenance["rotation_axis"]) == model.d_model
    axis = torch.tensor(provenance["rotation_axis"])
    assert abs(float(axis @ r.float())) < 1e-5 and float(axis.norm()) == pytest.approx(1.0, abs=1e-5)
    without = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4))
    assert "ace" not in without.chosen.provenance
    with pytest.raises(FeatsteerError, match="keep_activations=True"):
        without.affine_references()


def test_compare_picks_the_ace_and_angular_settings_on_validation_prompts(prompts):
    model = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    comparison = compare(model, *prompts, methods=["dim_ace_hook", "dim_angular_hook", "dim_ace_induce"],
                         direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=3))
    by_name = {r.method: r.details for r in comparison.results}
    ace, angular, induce = by_name["dim_ace_hook"], by_name["dim_angular_hook"], by_name["dim_ace_induce"]
    rows = {float(k.split("=")[1]): (v["unanswered_harmful"], v["kl_harmless"]) for k, v in ace["validation"].items()}
    assert set(rows) == {0.0, -0.25, -0.5} and ace["ace_alpha"] == gentlest_within(rows, 0.05)
    assert ace["setting"] == f"alpha={ace['ace_alpha']:g}" and len(ace["ace_values"]) == model.n_layers
    angles = {float(k.split("=")[1]): (v["unanswered_harmful"], v["kl_harmless"]) for k, v in angular["validation"].items()}
    assert set(angles) == {60.0, 75.0, 90.0, 120.0, 150.0, 180.0} and angular["angle"] == gentlest_within(angles, 0.05) and angular["adaptive"]
    rates = {float(k.split("=")[1]): v["refusal_harmless"] for k, v in induce["validation"].items()}
    assert induce["ace_alpha"] == weakest_within(rates, 0.05)
    assert "dim_ace_hook (alpha=" in comparison.table() and list(comparison.setup["steering"]["angles"]) == [60.0, 75.0, 90.0, 120.0, 150.0, 180.0]
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    fixed = compare(model, *prompts, methods=["dim_angular_hook"], direction_config=DirectionConfig(n_select=3),
                    generation=GenerationConfig(max_new_tokens=3), steering_config=SteeringMethodConfig(angle=170.0, adaptive=False))
    details = fixed.results[0].details
    assert details["angle"] == 170.0 and "validation" not in details and not details["adaptive"]


def test_angular_steering_at_the_norms_turns_what_blocks_read_and_leaves_the_stream(prompts):
    """At `NORMS` the rotation acts on each block's normalised inputs: it reaches the output, leaves layer 0's residual
    input alone, and its change reaches each norm's output as `dz * weight`, which a plain PyTorch hook on the norm
    module reproduces."""
    model = load_model("tiny:llama")
    plane = _plane(model.d_model, seed=5).float()
    batch = model.tokenize(prompts[0].prompts[:4])
    turn = AngularSteer(plane, 120.0, where=NORMS, adaptive=False)
    names = [name for name, _ in turn.hooks_for(model)]
    assert names == model.hook_names(("ln1_normalized", "ln2_normalized"))
    seen, base_seen = {}, {}
    record = [("blocks.0.hook_resid_pre", lambda x, s: seen.__setitem__("pre", x.clone()))]
    with steer(model, turn), model.hooks(record):
        steered = model.run(batch)
    with model.hooks([("blocks.0.hook_resid_pre", lambda x, s: base_seen.__setitem__("pre", x.clone()))]):
        base = model.run(batch)
    assert torch.equal(seen["pre"], base_seen["pre"]) and (steered - base).abs().max() > 1e-3

    def rotated_output(module, args, output):  # the same edit, written on the norm module's output by hand
        x = args[0].float()
        z = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return output + (rotate_in_plane(z, plane, 120.0) - z) * module.weight

    handles = [layer.input_layernorm.register_forward_hook(rotated_output) for layer in model.layers]
    handles += [layer.post_attention_layernorm.register_forward_hook(rotated_output) for layer in model.layers]
    try:
        with torch.inference_mode():
            by_hand = model.run(batch)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(steered, by_hand, atol=1e-4, rtol=0)


def test_compare_angular_at_the_norms(prompts):
    model = load_model("tiny:llama")
    comparison = compare(model, *prompts, methods=["dim_angular_norms_hook"], direction_config=DirectionConfig(n_select=3),
                         generation=GenerationConfig(max_new_tokens=3), steering_config=SteeringMethodConfig(angles=(90.0, 180.0)))
    details = comparison.results[0].details
    assert set(details["validation"]) == {"angle=90", "angle=180"} and details["angle"] in (90.0, 180.0)
    assert "dim_angular_norms_hook (angle=" in comparison.table()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ace_alpha": 1.0}, "below 1"), ({"ace_alphas": ()}, "ace_alphas is empty"), ({"ace_induce_alpha": 0.0}, "must be positive"),
    ({"tolerance": 1.5}, "tolerance"),
])
def test_steering_method_config_rejects_bad_values(kwargs, message):
    with pytest.raises(FeatsteerError, match=message):
        SteeringMethodConfig(**kwargs)


@pytest.mark.parametrize("build", [
    lambda r, plane: Ablate(r, strength=float("nan")),
    lambda r, plane: AddDirection(r, float("inf"), where="blocks.0.hook_resid_pre"),
    lambda r, plane: ProjectionSet(r, float("nan"), where="blocks.0.hook_resid_pre"),
    lambda r, plane: AffineEdit(r, {"blocks.0.hook_resid_pre": float("nan")}, {"blocks.0.hook_resid_pre": 1.0}),
    lambda r, plane: AngularSteer(plane, degrees=float("nan")),
])
def test_a_non_finite_setting_is_refused_when_the_intervention_is_built(build):
    # a NaN scale or value turns every steered activation into NaN, which run() and logits() would return without a word
    r = torch.nn.functional.normalize(torch.randn(8), dim=0)
    plane = torch.linalg.qr(torch.randn(8, 2)).Q.T
    with pytest.raises(FeatsteerError, match="give a finite number"):
        build(r, plane)


def test_a_non_finite_added_vector_is_refused_when_the_intervention_is_built():
    # Ablate, ProjectionSet, AffineEdit and AngularSteer check their vectors; AddDirection added a NaN one, and logits() came
    # back NaN without a word
    with pytest.raises(FeatsteerError, match="direction contains NaN/inf"):
        AddDirection(torch.tensor([1.0, float("nan"), 0.0]), 1.0, where="blocks.0.hook_resid_pre")


def test_a_basis_is_refused_where_one_vector_is_added_or_compared(llama_adapter):
    # a (2, d_model) basis was added row by row to a 2-token prompt's tokens without a word, and broke the forward pass
    # of any longer one with a broadcasting error
    basis = torch.linalg.qr(torch.randn(llama_adapter.d_model, 2, generator=torch.Generator().manual_seed(0))).Q.T
    with pytest.raises(FeatsteerError, match=r"adds one \(d_model,\) vector, got shape \(2, 64\)"):
        AddDirection(basis, 1.0, where="blocks.1.hook_resid_pre")
    with pytest.raises(FeatsteerError, match=r"one \(d_model,\) condition vector, got shape \(2, 64\)"):
        ConditionalSteer(basis, "blocks.1.hook_resid_pre", 0.0, AddDirection(basis[0], 1.0, where="blocks.1.hook_resid_pre"))


def test_interventions_at_one_hook_act_in_the_order_given(llama_adapter):
    # README: steer(model, A, B) with both at one hook: A acts first and B sees its output
    hook = "blocks.1.hook_resid_pre"
    r = torch.nn.functional.normalize(torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(0)), dim=0)
    ablate, add = Ablate(r, where=hook), AddDirection(r, 3.0, where=hook)
    prompts = ["hello there", "a longer prompt here"]
    with steer(llama_adapter, ablate):
        ablated = llama_adapter.logits(prompts)
    with steer(llama_adapter, add, ablate):
        added_then_ablated = llama_adapter.logits(prompts)
    with steer(llama_adapter, ablate, add):
        ablated_then_added = llama_adapter.logits(prompts)
    assert torch.allclose(added_then_ablated, ablated, atol=1e-5)
    assert not torch.allclose(ablated_then_added, ablated, atol=1e-3)
