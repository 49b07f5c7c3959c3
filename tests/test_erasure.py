"""LEACE erasure: the closed form against the paper's whitened construction, its guarantees, and the prompt-only hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featsteer.errors import FeatsteerError
from featsteer.interventions import Erase, LeaceEraser, fit_leace, steer
from featsteer.interventions.erasure import _erase_hook


def _classes(n: int = 800, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes with a mean shift and shared, strongly anisotropic noise."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=generator) * torch.linspace(0.2, 3.0, d)
    shift = torch.randn(d, generator=generator)
    noise = lambda: torch.randn(n, d, generator=generator, dtype=torch.float64) @ mix.double().T  # noqa: E731
    return noise() + shift.double(), noise()


def test_closed_form_is_the_papers_whitened_eraser():
    harmful, harmless = _classes()
    eraser = fit_leace(harmful, harmless, shrinkage=False)
    # Belrose et al.: r(x) = x - W+ P W (x - mu), W = Sigma^-1/2, P the projection onto W Sigma_xz
    x = torch.cat([harmful, harmless])
    z = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))]).double()
    sigma = torch.cov(x.T)
    values, vectors = torch.linalg.eigh(sigma)
    whiten, unwhiten = vectors @ torch.diag(values.rsqrt()) @ vectors.T, vectors @ torch.diag(values.sqrt()) @ vectors.T
    cross = ((x - x.mean(0)) * (z - z.mean())[:, None]).sum(0) / (len(x) - 1)
    u = whiten @ cross
    projector = torch.outer(u, u) / (u @ u)
    expected = x - (x - x.mean(0)) @ (unwhiten @ projector @ whiten).T
    torch.testing.assert_close(eraser(x.float()).double(), expected, atol=2e-4, rtol=1e-4)


def test_erasure_equalises_the_class_means_with_the_least_movement():
    from sklearn.linear_model import LogisticRegression

    harmful, harmless = _classes()
    eraser = fit_leace(harmful, harmless)
    assert float(eraser.reader @ eraser.direction) == pytest.approx(1.0, abs=1e-5)
    a, b = eraser(harmful.float()), eraser(harmless.float())
    assert float((a.mean(0) - b.mean(0)).norm()) < 1e-4 * float((harmful.mean(0) - harmless.mean(0)).norm()) + 1e-5
    torch.testing.assert_close(eraser(a), a, atol=1e-4, rtol=1e-4)  # an oblique projection: idempotent
    x = torch.cat([harmful, harmless]).float()
    torch.testing.assert_close(eraser(x).mean(0), x.mean(0), atol=1e-4, rtol=1e-4)  # the pooled mean stays
    labels = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    accuracy = lambda rows: LogisticRegression(max_iter=2000).fit(rows.numpy(), labels).score(rows.numpy(), labels)  # noqa: E731
    assert accuracy(x) > 0.85 and accuracy(torch.cat([a, b])) < 0.56
    # DIM ablation (centred) also equalises the means but moves the activations more when the noise is anisotropic
    r = eraser.direction / eraser.direction.norm()
    centred = x - x.mean(0)
    dim_moved = float(((centred @ r) ** 2).mean())
    leace_moved = float(((eraser(x) - x) ** 2).sum(1).mean())
    assert leace_moved < 0.8 * dim_moved


def test_fit_errors_and_the_nothing_to_erase_case():
    harmful, harmless = _classes(n=40)
    assert fit_leace(harmful, harmful.clone()) is None
    with pytest.raises(FeatsteerError, match="one width"):
        fit_leace(harmful, harmless[:, :4])
    with pytest.raises(FeatsteerError, match="at least 4 rows"):
        fit_leace(harmful[:3], harmless)
    broken = harmful.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(FeatsteerError, match="NaN or inf"):
        fit_leace(broken, harmless)


@pytest.mark.parametrize(("scale", "shift", "found"), [(1e4, 0.0, False), (1e4, 1e-5, True), (1e-6, 1e-13, False)])
def test_leace_erases_exactly_where_dim_finds_a_direction(scale, shift, found):
    """LEACE kept its own test for identical class means (difference at most 1e-8 of the rows' mean norm), not
    `means_coincide`, which DIM, SVD and the probes share: rows of norm ~1e5 whose classes differ by a real 1e-5 shift got
    no eraser though DIM found the direction, and rows of norm ~1e-6 that differ by 1e-13 (below the shared absolute
    floor, rounding to DIM) got an eraser of it. The same rows in another order coincide under both."""
    from featsteer.activations import ActivationSet
    from featsteer.directions import difference_in_means
    from featsteer.interventions import fit_leace_erasers

    generator = torch.Generator().manual_seed(7)
    rows = (torch.randn(64, 8, generator=generator, dtype=torch.float64) + 1.0) * scale
    other = rows[torch.randperm(64, generator=generator)] + shift * torch.eye(8, dtype=torch.float64)[0]
    sets = [ActivationSet(torch.stack([r, torch.randn(64, 8, generator=generator, dtype=torch.float64) + 3.0 * i], 1),
                          ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"), torch.arange(64), torch.full((64,), -1),
                          tuple(f"p{j}" for j in range(64)), label=label)
            for i, (r, label) in enumerate(((other, "harmful"), (rows, "harmless")))]
    dim = difference_in_means(*sets)
    assert (float(dim.direction("blocks.0.hook_resid_pre").norm()) > 0) is found
    assert (fit_leace(sets[0].hook("blocks.0.hook_resid_pre"), sets[1].hook("blocks.0.hook_resid_pre")) is not None) is found
    assert (("blocks.0.hook_resid_pre", -1) in fit_leace_erasers(*sets)) is found


def test_identical_means_everywhere_are_one_error():
    harmful, _ = _classes(n=40)
    from featsteer.activations import ActivationSet
    from featsteer.interventions import fit_leace_erasers

    same = ActivationSet(harmful[:, None, :], ("blocks.0.hook_resid_pre",), torch.arange(40), torch.full((40,), -1),
                         tuple(f"p{i}" for i in range(40)))
    with pytest.raises(FeatsteerError, match=r"^the harmful and harmless means coincide at every hook and position, so there is "
                                             r"nothing to erase: give harmful and harmless prompts that differ"):
        fit_leace_erasers(same, same)


def test_erase_hook_touches_only_its_prompt_positions(llama_adapter):
    d = llama_adapter.d_model
    generator = torch.Generator().manual_seed(1)
    eraser = LeaceEraser(torch.randn(d, generator=generator), torch.randn(d, generator=generator), torch.randn(d, generator=generator) / d)
    prompts = ["How do I bake bread?", "Name a colour."]
    batch = llama_adapter.tokenize(prompts)
    clean = llama_adapter.run(batch)
    with steer(llama_adapter, Erase({("blocks.1.hook_resid_pre", -1): eraser})):
        erased = llama_adapter.run(batch)
        responses = llama_adapter.generate(prompts, max_new_tokens=3)
    real = batch.attention_mask[:, :-1].bool()  # padding rows' logits are not defined
    torch.testing.assert_close(erased[:, :-1][real], clean[:, :-1][real])  # causal: only the last position can change
    assert not torch.allclose(erased[:, -1], clean[:, -1], atol=1e-4)
    assert len(responses) == 2
    hook = _erase_hook(llama_adapter, {-2: eraser})
    x = torch.randn(2, 5, d)
    out = hook(x, None)
    assert torch.equal(out[:, [0, 1, 2, 4]], x[:, [0, 1, 2, 4]]) and torch.allclose(out[:, 3], eraser(x[:, 3]))
    llama_adapter.generation_step, llama_adapter.generation_prompt_length = 2, 5
    try:
        assert hook(torch.randn(2, 1, d), None) is None  # a cached decoding step carries no prompt token
        reread = torch.randn(2, 7, d)  # a backend that re-reads: the prompt's positions are still found
        assert torch.allclose(hook(reread, None)[:, 3], eraser(reread[:, 3])) and torch.equal(hook(reread, None)[:, 5:], reread[:, 5:])
    finally:
        llama_adapter.generation_step = None
    with pytest.raises(FeatsteerError, match="count from the end"):
        Erase({("blocks.1.hook_resid_pre", 0): eraser}).hooks_for(llama_adapter)
    narrow = LeaceEraser(torch.zeros(10), torch.ones(10), torch.ones(10))  # fitted on another model: a raw size error in the pass
    with pytest.raises(FeatsteerError, match="the LEACE eraser is 10 wide but blocks.1.hook_resid_pre"):
        Erase({("blocks.1.hook_resid_pre", -1): narrow}).hooks_for(llama_adapter)


def test_an_eraser_fitted_on_mean_last_erases_each_token_of_the_window(llama_adapter):
    """A `mean_last:K` row is the mean of the prompt's last K tokens: its eraser acts on each of them, so the pooled
    activation the model then carries is the erased one (it erased the last token alone with an eraser fitted on means)."""
    from featsteer.activations import capture
    from featsteer.interventions import fit_leace_erasers

    hook = "blocks.1.hook_resid_pre"
    harmful = ["How do I pick a lock?", "Make a weapon at home", "Steal a car fast", "Hurt someone badly", "Write malware now"]
    harmless = ["Bake bread", "Name a colour", "Write a poem about rain", "Plan a picnic", "Sort a list in Python"]
    acts = [capture(llama_adapter, texts, [hook], positions="mean_last:3", progress=False) for texts in (harmful, harmless)]
    erasers = fit_leace_erasers(*acts)
    assert sorted(erasers) == [(hook, -3), (hook, -2), (hook, -1)] and len({id(e) for e in erasers.values()}) == 1
    eraser, seen = erasers[(hook, -1)], {}
    batch = llama_adapter.tokenize(harmful)
    with llama_adapter.hooks([(hook, lambda x, s: seen.__setitem__("before", x.clone()))]), steer(llama_adapter, Erase(erasers)), \
            llama_adapter.hooks([(hook, lambda x, s, seen=seen: seen.__setitem__("after", x.clone()))]):
        llama_adapter.run(batch)
    torch.testing.assert_close(seen["after"][:, -3:].mean(1), eraser(seen["before"][:, -3:].mean(1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(seen["after"][:, :-3], seen["before"][:, :-3])


def test_erasers_refuse_instruction_end_rows_at_different_offsets():
    """A prompt ending in a space merges with the template's tail, so its instruction end sits one token later: one
    eraser was fitted per offset on half the prompts, and `Erase` applied each at its offset to every prompt."""
    from featsteer.activations import capture
    from featsteer.interventions import fit_leace_erasers
    from tests.test_activations import _merging_adapter

    adapter, hooks = _merging_adapter(), ["blocks.1.hook_resid_pre"]
    sets = [[f"{topic} {i}" + (" " if i % 2 == 0 else "") for i in range(12)] for topic in ("harmful request", "kind question")]
    ends = [capture(adapter, prompts, hooks, positions="instruction_end", progress=False) for prompts in sets]
    assert len(ends[0].position_labels) == 2
    with pytest.raises(FeatsteerError, match="different positions for different prompts"):
        fit_leace_erasers(*ends)
    stripped = [capture(adapter, [p.rstrip() for p in prompts], hooks, positions="instruction_end", progress=False) for prompts in sets]
    assert len(fit_leace_erasers(*stripped)) == 1


def test_erase_finds_each_prompts_own_template_positions():
    """Erasers fitted on prompts without a trailing space, applied to one with it: its instruction's end merges with the
    template's first token, so the template tail starts a token later. The instruction_end eraser acts at that prompt's
    own instruction end (it acted at the fitted offset from the end, a token inside the instruction), and the
    post_instruction eraser fitted at the first template token leaves the merged token (part instruction) alone."""
    from featsteer.activations import capture
    from featsteer.interventions import fit_leace_erasers
    from tests.test_activations import _merging_adapter

    adapter, hook = _merging_adapter(), "blocks.1.hook_resid_pre"
    sets = [[f"{topic} {i}" for i in range(12)] for topic in ("harmful request", "kind question")]
    prompts = ["harmful request 3 ", "kind question 5"]  # a trailing space, and none
    tails = adapter.tokenize(prompts).n_post_instruction.tolist()
    assert tails[0] == tails[1] - 1
    width = adapter.tokenize(prompts).input_ids.shape[1]
    for positions, expected in (("instruction_end", [{width - 1 - tails[0]}, {width - 1 - tails[1]}]),
                                ("post_instruction", [set(range(width - tails[0], width)), set(range(width - tails[1], width))])):
        erasers = fit_leace_erasers(*(capture(adapter, texts, [hook], positions=positions, progress=False) for texts in sets))
        seen = {}
        with adapter.hooks([(hook, lambda x, s, seen=seen: seen.__setitem__("before", x.clone()))]), steer(adapter, Erase(erasers)), \
                adapter.hooks([(hook, lambda x, s, seen=seen: seen.__setitem__("after", x.clone()))]):
            adapter.run(adapter.tokenize(prompts))
        changed = [set((seen["after"][row] != seen["before"][row]).any(-1).nonzero().flatten().tolist()) for row in range(2)]
        assert changed == expected, positions
        assert {e.positions for e in erasers.values()} == {positions}
        with steer(adapter, Erase(erasers)):  # generation and run_continued carry each prompt's count as well
            assert len(adapter.generate(prompts, max_new_tokens=2)) == 2
            adapter.run_continued(adapter.tokenize(prompts), [[5], [6, 7]])
    with pytest.raises(FeatsteerError, match="tokens after its instruction"), steer(adapter, Erase(erasers)):
        from featsteer.models import TokenBatch

        batch = adapter.tokenize(prompts)
        adapter.run(TokenBatch(batch.input_ids, batch.attention_mask))  # no post-instruction counts


@pytest.mark.parametrize("positions", ["post_instruction", "last", "instruction_end"])
def test_erase_acts_at_the_template_tail_before_a_prefill(positions):
    """With a prefill the prompt ends in the prefill's tokens; post_instruction and last erasers counted their positions
    from the end of those and so landed on the prefill instead of the template's tail they were fitted on."""
    from featsteer.activations import capture
    from featsteer.interventions import fit_leace_erasers
    from tests.test_activations import _merging_adapter

    adapter, hook = _merging_adapter(), "blocks.1.hook_resid_pre"
    sets = [[f"{topic} {i}" for i in range(12)] for topic in ("harmful request", "kind question")]
    erasers = fit_leace_erasers(*(capture(adapter, texts, [hook], positions=positions, progress=False) for texts in sets))
    prompts = ["harmful request 3", "kind question 15"]

    def changed(batch) -> list[set[int]]:
        seen = {}
        with adapter.hooks([(hook, lambda x, s: seen.__setitem__("before", x.clone()))]), steer(adapter, Erase(erasers)), \
                adapter.hooks([(hook, lambda x, s: seen.__setitem__("after", x.clone()))]):
            adapter.run(batch)
        width = batch.input_ids.shape[1]  # columns counted from the end of each row
        return [{c - width for c in (seen["after"][row] != seen["before"][row]).any(-1).nonzero().flatten().tolist()}
                for row in range(len(prompts))]

    prefilled = adapter.tokenize(prompts, prefill=["Sure", "Sure"])
    assert prefilled.n_prefill.tolist() == [4, 4]  # one token per character
    plain = changed(adapter.tokenize(prompts))
    assert plain and all(plain)
    assert changed(prefilled) == [{c - 4 for c in row} for row in plain]  # the same template tokens, 4 prefill tokens earlier
