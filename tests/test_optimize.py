"""Refusal direction optimisation (`featsteer.directions.optimize`) on the organism: the losses it minimises fall, the
model is left as it was, the compare method picks among its snapshots."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from featsteer.datasets import builtin_prompts, load_prompts
from featsteer.directions import affirmative_opening
from featsteer.directions import optimize as optimize_module
from featsteer.directions.optimize import OptimizeConfig, optimize_direction
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, refusal_score
from featsteer.interventions import Ablate, steer
from featsteer.models import load_model
from featsteer.pipeline import DirectionConfig, find_refusal_direction

from .conftest import count_hooks

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"n_prompts": 24, "batch_size": 8, "target_tokens": 8}


@pytest.fixture(scope="module")
def organism():
    model = load_model("organism")
    model.show_progress = False
    return model


@pytest.fixture(scope="module")
def dim(organism):
    harmful, harmless = builtin_prompts("harmful", "train").head(48), builtin_prompts("harmless", "train").head(48)
    val = (load_prompts("organism-corpus:harmful:16"), load_prompts("organism-corpus:harmless:16"))
    return find_refusal_direction(organism, harmful, harmless, DirectionConfig(n_select=16), val=val, keep_activations=True)


def _losses(model, found, result, config: OptimizeConfig, direction: torch.Tensor) -> dict[str, float]:
    """Each loss over all of its targets, for a given unit direction (what the training steps estimate on mini-batches)."""
    harmful = list(result.train[0])[: config.n_prompts]
    harmless = list(result.train[1])[: config.n_prompts]
    targets = optimize_module._make_targets(model, found.start, found.hook, found.scale, harmful, harmless, config)
    extra = {"refusal": {"tokens": RefusalTokens.for_tokenizer(model.tokenizer)}}
    with torch.no_grad():
        return {name: float(optimize_module._LOSSES[name](model, direction, targets[name], list(range(len(targets[name].prompts))),
                                                          found.hook, found.scale, **extra.get(name, {})))
                for name in ("ablation", "retain", "refusal") if targets[name].prompts}


def test_config_rejects_bad_values():
    for bad, message in (({"steps": 0}, "steps must be at least 1"), ({"batch_size": 0}, "batch_size must be at least 1"),
                         ({"lr": float("nan")}, "lr must be a positive number"), ({"retain_weight": -1.0}, "loss weights"),
                         ({"ablation_weight": 0.0, "addition_weight": 0.0}, "nothing ties the direction to refusal"),
                         ({"refusal_weight": -1.0}, "loss weights"),
                         ({"steps": 4, "snapshots": (0, 5)}, "snapshots must lie in 0..steps"),
                         ({"retain_first_weight": 0.0}, "retain_first_weight must be a positive number"),
                         ({"ablation_targets": "sure"}, "ablation_targets must be one of ablated, affirm")):
        with pytest.raises(FeatsteerError, match=message):
            OptimizeConfig(**bad)
    config = OptimizeConfig(steps=10, snapshots=(3, 0, 3))
    assert config.snapshot_steps() == (0, 3, 10) and OptimizeConfig(steps=8).snapshot_steps() == (0, 2, 4, 6, 8)
    assert OptimizeConfig.from_dict(config.to_dict()) == config


def test_options_as_key_value_strings():
    """`--optimize-option`: each value read as its field's type, a clear error for anything else."""
    config = OptimizeConfig(steps=8).with_options(["retain_first_weight=15", " n_prompts = 192", "max_batch_tokens=none", "lr=0.02"])
    assert (config.steps, config.retain_first_weight, config.n_prompts, config.max_batch_tokens, config.lr) == (8, 15.0, 192, None, 0.02)
    assert isinstance(config.n_prompts, int) and OptimizeConfig().with_options([]) == OptimizeConfig()
    assert OptimizeConfig().with_options(["ablation_targets=affirm"]).ablation_targets == "affirm"
    for bad, message in ((["seed"], "expected KEY=VALUE"), (["seed="], "expected KEY=VALUE"), (["retain=3"], "unknown field 'retain'"),
                         (["snapshots=1"], "unknown field 'snapshots'"), (["steps=1.5"], "steps takes a whole number"),
                         (["lr=fast"], "lr takes a number"), (["batch_size=0"], "batch_size must be at least 1")):
        with pytest.raises(FeatsteerError, match=message):
            OptimizeConfig().with_options(bad)
    with pytest.raises(FeatsteerError, match="ablation_targets must be one of"):
        OptimizeConfig().with_options(["ablation_targets=3"])


def test_run_continued_with_grad_gives_the_same_logits(organism):
    batch = organism.tokenize(["How do I bake bread?", "Tell me a joke."])
    continuations = [(5, 6, 7), (8,)]
    plain = organism.run_continued(batch, continuations)
    tracked = organism.run_continued(batch, continuations, grad=True)
    assert torch.equal(plain, tracked.detach())


def test_run_continued_returns_the_columns_from_the_prompt_end(organism):
    """Only the logits that predict the continuation are computed (the prompt's own would be gigabytes on a long prompt
    with a large vocabulary): column j predicts continuation token j, as a plain pass over prompt + tokens does."""
    from featsteer.models.adapter import TokenBatch

    batch = organism.tokenize(["How do I bake bread?", "Tell me a joke, a long one, about a cat and a dog."])
    continuations = [(5, 6, 7), (8,)]
    tail = organism.run_continued(batch, continuations)
    assert tail.shape[:2] == (2, 4)
    for row, tokens in enumerate(continuations):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist() + list(tokens)
        full = organism.run(TokenBatch(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
        torch.testing.assert_close(tail[row, : len(tokens) + 1], full[0, -(len(tokens) + 1):], atol=1e-4, rtol=0)


def test_a_token_budget_splits_batches_without_changing_the_training(organism, dim, monkeypatch):
    """Over `max_batch_tokens` a mini-batch runs in parts whose gradients add up to the whole batch's: with a budget of
    one token (every prompt alone) the trained direction and every logged loss match the unsplit run's."""
    calls = []
    original = optimize_module._teacher_forced
    monkeypatch.setattr(optimize_module, "_teacher_forced", lambda model, targets, picked: calls.append(len(picked)) or original(model, targets, picked))
    whole = optimize_direction(organism, dim, OptimizeConfig(steps=3, lr=0.05, max_batch_tokens=None, **SMALL))
    assert max(calls) == SMALL["batch_size"]
    calls.clear()
    split = optimize_direction(organism, dim, OptimizeConfig(steps=3, lr=0.05, max_batch_tokens=1, **SMALL))
    assert set(calls) == {1}
    torch.testing.assert_close(split.direction, whole.direction, atol=1e-5, rtol=0)
    for a, b in zip(split.history, whole.history, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    # Adam would hide a gradient that is a multiple of the right one: compare one step's gradients themselves
    config = OptimizeConfig(refusal_weight=1.0, **SMALL)
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    targets = optimize_module._make_targets(organism, whole.start, whole.hook, whole.scale, harmful, harmless, config)
    tokens = RefusalTokens.for_tokenizer(organism.tokenizer)
    for name, extra in (("ablation", {}), ("retain", {}), ("retain", {"first_weight": 7.0}), ("refusal", {"tokens": tokens})):
        found = []
        for budget in (None, 1):
            parameter = whole.start.clone().requires_grad_(True)
            value = optimize_module._accumulate(organism, parameter, name, 2.0, targets[name], list(range(8)), whole.hook, whole.scale,
                                                dataclasses.replace(config, max_batch_tokens=budget), 1, extra)
            found.append((value, parameter.grad))
        assert found[1][0] == pytest.approx(found[0][0], abs=1e-6), name
        # float32 padding noise scales with the gradient (the refusal loss's is ten times the others'); a wrong share is O(1) of it
        torch.testing.assert_close(found[1][1], found[0][1], atol=1e-4 * float(found[0][1].abs().max()), rtol=1e-4)
    with pytest.raises(FeatsteerError, match="max_batch_tokens must be at least 1"):
        OptimizeConfig(max_batch_tokens=0)


def test_targets_are_the_generated_token_ids_with_their_end_of_turn(organism, dim):
    """Every generated target is the token ids the model generated (`generate_with_tokens`), not its answer's text
    tokenized again, and an answer that ended its turn within `target_tokens` keeps its end-of-turn token, so the
    losses also read the position where the model ends its turn."""
    from featsteer.evaluation.refusal import RefusalDetector

    config = OptimizeConfig(**{**SMALL, "target_tokens": 32})
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    start = dim.chosen_basis[0].float()
    targets = optimize_module._make_targets(organism, start, dim.selection.chosen.hook, 1.0, harmful, harmless, config)
    own = organism.generate_with_tokens(harmless, max_new_tokens=32, batch_size=config.batch_size, keep_logits=False)
    assert targets["retain"].prompts == tuple(harmless) and targets["retain"].tokens == tuple(own.token_ids)
    assert targets["retain"].generated and targets["ablation"].generated  # read after the prompt generation started from
    stops = organism.stop_token_ids
    assert sum(tokens[-1] in stops for tokens in targets["retain"].tokens) >= len(harmless) // 2
    with steer(organism, Ablate(start)):
        ablated = organism.generate_with_tokens(harmful, max_new_tokens=32, batch_size=config.batch_size, keep_logits=False)
    detector = RefusalDetector()
    answered = [i for i, text in enumerate(ablated.texts) if not detector.is_refusal(text)]
    assert answered and targets["ablation"].tokens == tuple(ablated.token_ids[i] for i in answered)
    assert any(tokens[-1] in stops for tokens in targets["ablation"].tokens)
    # at the cap an answer has no end-of-turn token: the targets are the ids it was cut at
    short = optimize_module._make_targets(organism, start, dim.selection.chosen.hook, 1.0, harmful, harmless, OptimizeConfig(**SMALL))
    assert all(len(tokens) <= SMALL["target_tokens"] for tokens in short["retain"].tokens)
    assert short["retain"].tokens == tuple(organism.generate_with_tokens(harmless, max_new_tokens=SMALL["target_tokens"],
                                                                          batch_size=8, keep_logits=False).token_ids)


def test_an_answer_that_only_ends_its_turn_is_a_retain_target_only(organism, dim, monkeypatch):
    """An answer of nothing but the end-of-turn token: the retain loss keeps it (its one position is the one that
    predicts ending the turn at once); the cross-entropy losses do not (the detector reads it as a refusal only because
    nothing was said)."""
    from featsteer.models.adapter import Generation

    eos = organism.tokenizer.eos_token_id
    monkeypatch.setattr(organism, "generate_with_tokens",
                        lambda prompts, **k: Generation([""] * len(prompts), [(eos,)] * len(prompts), None))
    config = OptimizeConfig(**SMALL)
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    targets = optimize_module._make_targets(organism, dim.chosen_basis[0].float(), dim.selection.chosen.hook, 1.0, harmful,
                                            harmless, config)
    assert targets["retain"].prompts == tuple(harmless) and set(targets["retain"].tokens) == {(eos,)}
    assert targets["ablation"].prompts == () and targets["addition"].prompts == ()


def test_retain_first_weight_counts_the_first_position_that_many_times(organism, dim):
    """The retain loss is a weighted mean of per-position KLs: at weight w the prompt's last position (the first generated
    token's distribution) counts w times, so with the per-position KLs read by hand the loss is (w KL_0 + rest) / (w - 1 + n)."""
    config = OptimizeConfig(**SMALL)
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    start = dim.chosen_basis[0].float() / dim.chosen_basis[0].float().norm()
    targets = optimize_module._make_targets(organism, start, dim.selection.chosen.hook, 1.0, harmful, harmless, config)["retain"]
    rows = list(range(6))
    direction = torch.nn.functional.normalize(start + 0.5 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0)), dim=0)
    firsts, rests, counts = [], [], []
    for i in rows:  # one row at a time: per-position KLs without any padding
        batch = organism.tokenize([targets.prompts[i]])
        continuation = [targets.tokens[i][:-1]]
        base = torch.log_softmax(organism.run_continued(batch, continuation)[0].double(), dim=-1)
        with steer(organism, Ablate(direction)):
            edited = torch.log_softmax(organism.run_continued(batch, continuation)[0].double(), dim=-1)
        kl = (base.exp() * (base - edited)).sum(dim=-1)[: len(targets.tokens[i])]
        firsts.append(float(kl[0])), rests.append(float(kl[1:].sum())), counts.append(len(kl))
    assert min(firsts) > 0 and sum(rests) > 0
    with torch.no_grad():
        for weight in (1.0, 4.0, 15.0):
            loss = float(optimize_module._retain_loss(organism, direction, targets, rows, "unused", 1.0, first_weight=weight))
            expected = (weight * sum(firsts) + sum(rests)) / sum(weight - 1 + n for n in counts)
            assert loss == pytest.approx(expected, rel=1e-4), weight


def test_refusal_loss_is_the_mean_softplus_of_the_ablated_refusal_score(organism, dim):
    """The refusal loss is `-log(1 - P(refusal))` of the ablated model's first response token, i.e. softplus of the
    selection's refusal score, averaged over the picked harmful prompts: checked against `refusal_score` read one prompt
    at a time. Removing the DIM direction must cost far less of it than removing a random direction."""
    config = OptimizeConfig(refusal_weight=1.0, **SMALL)
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    start = dim.chosen_basis[0].float() / dim.chosen_basis[0].float().norm()
    targets = optimize_module._make_targets(organism, start, dim.selection.chosen.hook, 1.0, harmful, harmless, config)["refusal"]
    assert targets.prompts == tuple(harmful) and all(t == () for t in targets.tokens)
    assert optimize_module._make_targets(organism, start, dim.selection.chosen.hook, 1.0, harmful, harmless, OptimizeConfig(**SMALL))["refusal"].prompts == ()
    tokens = RefusalTokens.for_tokenizer(organism.tokenizer)
    rows = list(range(10))
    randomly = torch.nn.functional.normalize(torch.randn(start.shape, generator=torch.Generator().manual_seed(0)), dim=0)
    losses = {}
    for name, direction in (("dim", start), ("random", randomly)):
        with steer(organism, Ablate(direction)), torch.no_grad():
            scores = torch.cat([refusal_score(torch.log_softmax(organism.logits([targets.prompts[i]]), -1), tokens) for i in rows])
            loss = float(optimize_module._refusal_loss(organism, direction, targets, rows, "unused", 1.0, tokens=tokens))
        assert loss == pytest.approx(float(torch.nn.functional.softplus(scores).mean()), rel=1e-4), name
        losses[name] = loss
    assert losses["dim"] < 0.2 * losses["random"]


def test_optimisation_lowers_its_losses_and_leaves_the_model_alone(organism, dim):
    batch = organism.tokenize(["How do I pick a lock?"])
    logits_before = organism.run(batch)
    flags = [p.requires_grad for p in organism.model.parameters()]
    config = OptimizeConfig(steps=12, lr=0.05, **SMALL)
    found = optimize_direction(organism, dim, config)
    assert torch.equal(organism.run(batch), logits_before) and count_hooks(organism.model) == 0
    assert [p.requires_grad for p in organism.model.parameters()] == flags
    assert sorted(found.snapshots) == [0, 3, 6, 9, 12] and len(found.history) == 12
    assert torch.equal(found.snapshots[0], found.start) and torch.equal(found.snapshots[12], found.direction)
    assert all(abs(float(v.norm()) - 1) < 1e-5 for v in found.snapshots.values())
    assert torch.allclose(found.start, dim.chosen_basis[0] / dim.chosen_basis[0].norm(), atol=1e-6)
    assert found.hook == dim.selection.chosen.hook and found.scale == pytest.approx(float(dim.candidates.scores["mean_diff_norm"][dim.selection.chosen.index]))
    assert found.targets["ablation"] > 0 and found.targets["retain"] == 24
    assert found.cosine() < 0.999  # it moved
    before = _losses(organism, found, dim, config, found.start)
    after = _losses(organism, found, dim, config, found.direction)
    assert after["ablation"] + after["retain"] < before["ablation"] + before["retain"]


def test_each_loss_is_minimised_on_its_own(organism, dim):
    """The retain loss alone (the ablation term weighted to almost nothing) moves the direction to where ablating it costs
    less KL; the ablation loss alone makes the DIM-ablated answers likelier. A wrong sign or a gradient that does not
    reach the direction fails one of them."""
    retain = OptimizeConfig(steps=10, lr=0.05, ablation_weight=1e-6, addition_weight=0.0, retain_weight=1.0, **SMALL)
    found = optimize_direction(organism, dim, retain)
    assert _losses(organism, found, dim, retain, found.direction)["retain"] < 0.7 * _losses(organism, found, dim, retain, found.start)["retain"]
    ablation = dataclasses.replace(retain, ablation_weight=1.0, retain_weight=0.0)
    found = optimize_direction(organism, dim, ablation)
    assert _losses(organism, found, dim, ablation, found.direction)["ablation"] < _losses(organism, found, dim, ablation, found.start)["ablation"] - 0.02
    refusal = dataclasses.replace(retain, ablation_weight=0.0, retain_weight=0.0, refusal_weight=1.0)
    found = optimize_direction(organism, dim, refusal)
    assert "ablation" not in found.history[0] and "refusal" in found.history[0]
    assert _losses(organism, found, dim, refusal, found.direction)["refusal"] < 0.7 * _losses(organism, found, dim, refusal, found.start)["refusal"]


def test_affirmative_targets_are_every_harmful_prompts_opening_and_training_makes_them_likelier(organism, dim, monkeypatch):
    """`ablation_targets="affirm"`: the ablation loss reads each harmful training prompt's affirmative opening (no
    DIM-ablated generation, none dropped), truncated to `target_tokens`, and training on it alone makes those openings
    likelier with the direction removed."""
    config = OptimizeConfig(steps=10, lr=0.05, ablation_targets="affirm", addition_weight=0.0, retain_weight=0.0, **SMALL)
    harmful = list(dim.train[0])[: config.n_prompts]
    harmless = list(dim.train[1])[: config.n_prompts]
    calls = []
    generate = organism.generate_with_tokens
    monkeypatch.setattr(organism, "generate_with_tokens", lambda prompts, **k: calls.append(list(prompts)) or generate(prompts, **k))
    targets = optimize_module._make_targets(organism, dim.chosen_basis[0].float(), dim.selection.chosen.hook, 1.0, harmful, harmless, config)
    assert harmful not in calls and calls  # the harmful prompts are not decoded (the harmless ones are)
    assert targets["ablation"].prompts == tuple(harmful)
    for prompt, tokens in zip(harmful, targets["ablation"].tokens, strict=True):
        wanted = organism.tokenizer(affirmative_opening(prompt), add_special_tokens=False)["input_ids"][: config.target_tokens]
        assert list(tokens) == wanted and organism.tokenizer.decode(tokens).startswith("Sure, here")
    monkeypatch.undo()
    found = optimize_direction(organism, dim, config)
    before = _losses(organism, found, dim, config, found.start)["ablation"]
    assert _losses(organism, found, dim, config, found.direction)["ablation"] < before - 0.1


def test_optimisation_is_reproducible(organism, dim):
    config = OptimizeConfig(steps=3, **SMALL)
    first, second = optimize_direction(organism, dim, config), optimize_direction(organism, dim, config)
    assert torch.equal(first.direction, second.direction)
    assert not torch.equal(first.direction, optimize_direction(organism, dim, dataclasses.replace(config, seed=1)).direction)


def test_an_error_mid_training_leaves_no_hook_and_no_frozen_parameter(organism, dim, monkeypatch):
    flags = [p.requires_grad for p in organism.model.parameters()]

    def broken(model, direction, targets, picked, hook, scale, **_):
        with steer(model, Ablate(direction)):
            raise RuntimeError("boom")

    monkeypatch.setitem(optimize_module._LOSSES, "retain", broken)
    with pytest.raises(RuntimeError, match="boom"):
        optimize_direction(organism, dim, OptimizeConfig(steps=2, **SMALL))
    assert count_hooks(organism.model) == 0 and [p.requires_grad for p in organism.model.parameters()] == flags


def test_rank_k_and_target_less_starts_are_clear_errors(organism, dim, monkeypatch):
    harmful, harmless = builtin_prompts("harmful", "train").head(24), builtin_prompts("harmless", "train").head(24)
    svd = find_refusal_direction(organism, harmful, harmless, DirectionConfig(method="svd", rank=2, n_select=8))
    with pytest.raises(FeatsteerError, match="starts from a rank-1 direction"):
        optimize_direction(organism, svd, OptimizeConfig(steps=1, **SMALL))
    empty = optimize_module._Targets((), (), ())
    monkeypatch.setattr(optimize_module, "_make_targets", lambda *a, **k: dict.fromkeys(optimize_module._LOSSES, empty))
    with pytest.raises(FeatsteerError, match="no ablation or addition targets"):
        optimize_direction(organism, dim, OptimizeConfig(steps=1, **SMALL))


def test_compare_picks_a_snapshot_and_records_it(organism):
    from featsteer.compare import compare
    from featsteer.evaluation.behaviour import GenerationConfig

    harmful, harmless = builtin_prompts("harmful", "train").head(32), builtin_prompts("harmless", "train").head(32)
    result = compare(organism, harmful, harmless, methods=["dim_abliteration", "dim_optimized_abliteration"],
                     eval_harmful=builtin_prompts("harmful", "test").head(8), eval_harmless=builtin_prompts("harmless", "test").head(8),
                     val_harmful=load_prompts("organism-corpus:harmful:8"), val_harmless=load_prompts("organism-corpus:harmless:8"),
                     direction_config=DirectionConfig(n_select=8), generation=GenerationConfig(max_new_tokens=8),
                     optimize_config=OptimizeConfig(steps=4, **SMALL))
    rows = {r.method: r for r in result.results}
    details = rows["dim_optimized_abliteration"].details
    assert details["setting"] in {f"steps={s}" for s in (0, 1, 2, 3, 4)}
    assert set(details["validation"]) == {f"steps={s}" for s in (0, 1, 2, 3, 4)}
    assert details["optimization"]["config"]["steps"] == 4 and len(details["optimization"]["history"]) == 4
    assert result.setup["optimize"]["steps"] == 4
    if details["setting"] == "steps=0":  # DIM itself: the same edit as the baseline
        assert rows["dim_optimized_abliteration"].kl_harmless == pytest.approx(rows["dim_abliteration"].kl_harmless, abs=1e-6)


def test_the_gated_trained_direction_shares_the_training_run_and_the_gate(organism, monkeypatch):
    from featsteer.compare import compare, method_context
    from featsteer.evaluation.behaviour import GenerationConfig

    runs = []
    real = optimize_module.optimize_direction
    monkeypatch.setattr(optimize_module, "optimize_direction", lambda *a, **k: runs.append(1) or real(*a, **k))
    harmful, harmless = builtin_prompts("harmful", "train").head(32), builtin_prompts("harmless", "train").head(32)
    eval_harmful, eval_harmless = builtin_prompts("harmful", "test").head(8), builtin_prompts("harmless", "test").head(8)
    names = ["dim_optimized_abliteration", "dim_conditional_ablation_hook", "dim_optimized_conditional_ablation_hook"]
    result = compare(organism, harmful, harmless, methods=names, eval_harmful=eval_harmful, eval_harmless=eval_harmless,
                     val_harmful=load_prompts("organism-corpus:harmful:8"), val_harmless=load_prompts("organism-corpus:harmless:8"),
                     direction_config=DirectionConfig(n_select=8), generation=GenerationConfig(max_new_tokens=8),
                     optimize_config=OptimizeConfig(steps=4, **SMALL))
    assert len(runs) == 1  # one training run between the two methods that read it
    rows = {r.method: r for r in result.results}
    gated = rows["dim_optimized_conditional_ablation_hook"].details
    assert gated["gate"] == rows["dim_conditional_ablation_hook"].details["gate"]
    assert gated["optimization"] == rows["dim_optimized_abliteration"].details["optimization"]
    assert set(gated["validation"]) == {f"steps={s}" for s in (0, 1, 2, 3, 4)} and result.setup["optimize"]["steps"] == 4
    step = int(gated["setting"].split(",")[0].removeprefix("steps="))
    # the method is the picked snapshot ablated behind the gate: the prompts it fires on change, the others do not
    ctx, prompts = result.context, eval_harmful.prompts[:4] + eval_harmless.prompts[:4]
    gate = ctx.gate()
    fires = gate.scores(organism, prompts) > gate.threshold
    assert fires[:4].any() and not fires.all()
    base = organism.logits(prompts)
    with method_context(ctx, "dim_optimized_conditional_ablation_hook"):
        steered = organism.logits(prompts)
    with steer(organism, gate.ablate(organism, ctx.optimized().snapshots[step][None])):
        expected = organism.logits(prompts)
    torch.testing.assert_close(steered, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(steered[~fires], base[~fires], atol=1e-6, rtol=0)
    assert (steered[fires] - base[fires]).abs().amax() > 1e-3
    assert count_hooks(organism.model) == 0


def test_targets_are_generated_and_read_under_the_directions_system_prompt(organism, dim, monkeypatch):
    """Every target answer is generated, and every target prompt read, with the system prompt the direction was found
    under, so the losses score what the model says in the run's deployment context."""
    system = "You are a terse assistant."
    seen: list = []
    original = organism.generate_with_tokens

    def record(prompts, **kwargs):
        seen.append(kwargs.get("system"))
        return original(prompts, **kwargs)

    monkeypatch.setattr(organism, "generate_with_tokens", record)
    config = OptimizeConfig(**SMALL)
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    targets = optimize_module._make_targets(organism, dim.chosen_basis[0].float(), dim.selection.chosen.hook, 1.0, harmful,
                                            harmless, config, system)
    assert seen == [system] * 3
    assert all(t.system == system for t in targets.values())
    retain = targets["retain"]
    assert retain.prompt_lengths == tuple(len(organism.tokenize([p], system=system).input_ids[0]) for p in retain.prompts)
    assert retain.tokens == tuple(original(harmless, max_new_tokens=SMALL["target_tokens"], batch_size=config.batch_size,
                                           keep_logits=False, system=system).token_ids)



@pytest.mark.parametrize("budget", [None, 1])
def test_each_training_prompt_is_tokenized_once_for_every_step(organism, dim, monkeypatch, budget):
    """Besides the generation of its targets, the training tokenizes each prompt once: every step's mini-batches (split
    to one prompt each at a budget of one token, and read by every loss) are padded from that encoding. It counted each
    prompt's length alone and then tokenized every mini-batch again at every step."""
    from tests.conftest import record_tokenizer_calls

    config = OptimizeConfig(steps=4, refusal_weight=1.0, max_batch_tokens=budget, **SMALL)
    harmful, harmless = list(dim.train[0])[: config.n_prompts], list(dim.train[1])[: config.n_prompts]
    calls, original = record_tokenizer_calls(organism, monkeypatch), organism.generate_with_tokens

    def generate(prompts, **kwargs):
        before = len(calls)
        try:
            return original(prompts, **kwargs)
        finally:
            del calls[before:]  # the generation's own tokenization, once per prompt (tests/test_models.py)

    monkeypatch.setattr(organism, "generate_with_tokens", generate)
    found = optimize_direction(organism, dim, config)
    assert found.targets["ablation"] and found.targets["retain"] and found.targets["refusal"] == len(harmful)
    formatted = [f.text for f in organism.format_prompts([*harmful, *harmless])]
    assert sorted(text for text in calls if text in set(formatted)) == sorted(formatted)
