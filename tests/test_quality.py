"""Loop detection (`featsteer.evaluation.quality`) and the base-model likelihood of responses."""

from __future__ import annotations

import pytest

from featsteer.errors import FeatsteerError
from featsteer.evaluation import LoopDetector, looping_rate

FLUENT = [
    "Sure! Here is a short overview of how photosynthesis works: plants turn light, water and carbon dioxide into sugar.",
    "I'm sorry, but I can't help with that. If you are in danger, please contact local emergency services.",
    "1. Preheat the oven to 180C.\n2. Mix the flour and sugar.\n3. Add the eggs.\n4. Bake for 25 minutes.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "That is a very very very good question, and the answer depends on the context you give it.",
    "Hahaha!",
    "",
]

LOOPS = [
    "IIIIIIIIIIIIIIIIIIIIIIIIIIIIIIII",
    "I'mI'mI'mI'mI'mI'mI'mI'mI'mI'mI'mI'mI'mI'mI'mI'm",
    "Sure!I'm sorryI'm sorryI'm sorryI'm sorryI'm sorryI'm sorryI'm sorry",
    "I'm sorry, but I can't help withI'm sorry, but I can't help withI'm sorry, but I can't",
    "the the the the the the the the the the the the",
    "I'mI'mI'mI'mI'mI'mI'mI'mI'mIIIIIIIIIIIIIIII",  # one loop drifting into another
    "Here is the plan: step step step step step step step step step step step step step   ",
]


@pytest.mark.parametrize("text", FLUENT)
def test_fluent_text_is_not_looping(text):
    assert not LoopDetector().is_looping(text)


@pytest.mark.parametrize("text", LOOPS)
def test_loops_are_found(text):
    assert LoopDetector().is_looping(text)


def test_tail_reports_units_latest_first_and_cover():
    tail = LoopDetector().tail("Sure!I'mI'mI'mI'mI'mIIIIIIIIIIII")
    assert [loop.unit for loop in tail.loops][:2] == ["I", "I'm"]
    assert tail.loops[0].repeats == 12 and tail.loops[1].repeats == 5
    assert 0.8 < tail.cover < 1.0
    assert tail.cover == pytest.approx(27 / 32)


def test_short_echo_below_min_copied_is_not_a_loop():
    # 'ab' twice copies 2 characters: below the default 8, so no run is cut at all
    assert LoopDetector().tail("abab").loops == ()
    assert LoopDetector(min_copied=2).is_looping("abab")


def test_min_cover_decides_partial_loops():
    text = "A perfectly ordinary opening sentence of some length. " + "ha" * 10
    assert not LoopDetector().is_looping(text)
    assert LoopDetector(min_cover=0.2).is_looping(text)


def test_looping_rate_counts_and_bounds():
    rate = looping_rate(FLUENT[:3] + LOOPS[:2])
    assert (rate.k, rate.n) == (2, 5)
    assert rate.low < 0.4 < rate.high


def test_bad_settings_and_empty_input_fail_clearly():
    with pytest.raises(FeatsteerError, match="min_cover"):
        LoopDetector(min_cover=0)
    with pytest.raises(FeatsteerError, match="min_copied"):
        LoopDetector(min_copied=0)
    with pytest.raises(FeatsteerError, match="at least one response"):
        looping_rate([])


@pytest.fixture(scope="module")
def organism():
    from featsteer.models import load_model

    return load_model("organism")


def test_organism_answers_do_not_loop_and_a_heavy_push_makes_them(organism):
    """Behaviour: the organism's own answers are fluent; adding its harmful-minus-harmless mean difference at 8x at
    every layer breaks it into repetition, which the refusal detector alone cannot tell from a refusal or an answer."""
    from featsteer.activations import capture
    from featsteer.datasets import load_prompts
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.interventions import AddDirection, steer

    harmless = load_prompts("builtin:harmless:test", limit=24)
    plain = evaluate_set(organism, harmless, "harmless", GenerationConfig(max_new_tokens=32), RefusalDetector())
    assert plain.looping_rate.k == 0
    hook = "blocks.2.hook_resid_pre"
    means = [capture(organism, load_prompts(f"builtin:{kind}:train", limit=32), [hook], progress=False).at_position(hook).double().mean(0)
             for kind in ("harmful", "harmless")]
    vector = (means[0] - means[1]).float()
    with steer(organism, AddDirection(vector, 8.0, where=organism.hook_names(("resid_pre",)))):
        pushed = evaluate_set(organism, harmless, "harmless", GenerationConfig(max_new_tokens=32), RefusalDetector())
    assert pushed.looping_rate.rate >= 0.5, pushed.responses[:3]


def test_responses_nll_is_lowest_for_the_models_own_answers(organism):
    from featsteer.datasets import load_prompts
    from featsteer.evaluation.behaviour import GenerationConfig, SetResult, evaluate_set, responses_nll
    from featsteer.evaluation.refusal import RefusalDetector

    harmless = load_prompts("builtin:harmless:test", limit=16)
    own = evaluate_set(organism, harmless, "harmless", GenerationConfig(max_new_tokens=24), RefusalDetector())
    shuffled = SetResult("shuffled", own.prompts, own.responses[1:] + own.responses[:1], own.refused, own.rate)
    empty = SetResult("empty", own.prompts, ("",) * len(own.prompts), own.refused, own.rate)
    own_nll, shuffled_nll = responses_nll(organism, own), responses_nll(organism, shuffled)
    assert 0 < own_nll < shuffled_nll
    assert responses_nll(organism, empty) is None
