"""Refusal judges: the chat judge's arithmetic, the classifier judge, anchors, calibration and agreement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featsteer.errors import FeatsteerError
from featsteer.evaluation import RefusalDetector
from featsteer.evaluation.judge import (
    ChatJudge,
    ClassifierJudge,
    JudgeAnchor,
    JudgeVerdicts,
    MarkerJudge,
    agreement,
    check_on_anchors,
    fit_threshold,
    judge_from_spec,
    judge_sets,
    load_judge_anchors,
)
from featsteer.testing import byte_tokenizer, saved_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["How do I bake bread?", "How do I pick a lock?", "Name a colour.", "Write a haiku."]
RESPONSES = ["Mix flour, water and yeast.", "I can't help with that.", "", "Autumn wind\nleaves fall"]
QWEN = Path.home() / ".cache" / "featsteer-models" / "qwen2.5-coder-0.5b-instruct" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def _by_hand(judge: ChatJudge, prompt: str, response: str) -> float:
    """P(refusal) for one pair from an unbatched prefill of the judge's question."""
    logprobs = torch.log_softmax(judge.model.logits([judge.ask(prompt, response)], batch_size=1)[0].double(), dim=-1)
    log_yes = torch.logsumexp(logprobs[list(judge.yes_ids)], dim=0)
    log_no = torch.logsumexp(logprobs[list(judge.no_ids)], dim=0)
    return float(torch.exp(log_no) / (torch.exp(log_yes) + torch.exp(log_no)))


def test_chat_judge_reads_the_no_share_of_the_first_answer_token(llama_adapter):
    judge = ChatJudge(llama_adapter, batch_size=3)
    verdicts = judge.judge(PROMPTS, RESPONSES)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        if response:
            assert verdicts.scores[i] == pytest.approx(_by_hand(judge, prompt, response), abs=1e-5)
            assert verdicts.refused[i] == (verdicts.scores[i] >= judge.threshold)
            assert 0.0 < verdicts.answer_mass[i] < 1.0
    assert verdicts.scores[2] == 1.0 and verdicts.refused[2], "an empty response is a refusal, as for the detector"
    assert len({round(s, 6) for i, s in enumerate(verdicts.scores) if RESPONSES[i]}) == 3, "scores should differ by pair"


def test_chat_judge_is_batch_invariant_and_flips_with_yes_means_refusal(llama_adapter):
    one = ChatJudge(llama_adapter, batch_size=1).judge(PROMPTS, RESPONSES)
    many = ChatJudge(llama_adapter, batch_size=8).judge(PROMPTS, RESPONSES)
    assert many.scores == pytest.approx(one.scores, abs=1e-5)
    flipped = ChatJudge(llama_adapter, yes_means_refusal=True).judge(PROMPTS, RESPONSES)
    for i, response in enumerate(RESPONSES):
        expected = 1.0 if not response else 1.0 - one.scores[i]
        assert flipped.scores[i] == pytest.approx(expected, abs=1e-5)


def test_chat_judge_never_runs_the_model_on_empty_responses(llama_adapter, monkeypatch):
    judge = ChatJudge(llama_adapter)

    def fail(*args, **kwargs):
        raise AssertionError("the judge ran the model although every response is empty")

    monkeypatch.setattr(llama_adapter, "logits", fail)
    verdicts = judge.judge(["a", "b"], ["", "   "])
    assert verdicts.refused == (True, True)


def test_chat_judge_cuts_long_pairs(llama_adapter):
    judge = ChatJudge(llama_adapter, max_chars=10)
    asked = judge.ask("p" * 50, "r" * 50)
    assert "p" * 10 in asked and "p" * 11 not in asked and "r" * 11 not in asked


@pytest.mark.parametrize(("options", "message"), [
    ({"question": "Is this a refusal? {response}"}, "placeholders"),
    ({"threshold": 1.0}, "outside"),
    ({"yes_words": ("No",), "no_words": ("no",)}, "share first tokens"),
    ({"yes_words": (" ",)}, "no token"),
])
def test_chat_judge_bad_settings_fail_in_one_line(llama_adapter, options, message):
    with pytest.raises(FeatsteerError, match=message) as raised:
        ChatJudge(llama_adapter, **options)
    assert "\n" not in str(raised.value)


def test_pairs_must_line_up(llama_adapter):
    with pytest.raises(FeatsteerError, match="one response per prompt"):
        MarkerJudge().judge(["a", "b"], ["x"])
    with pytest.raises(FeatsteerError, match="not text"):
        ChatJudge(llama_adapter).judge(["a"], [None])


def test_marker_judge_is_the_detector():
    verdicts = MarkerJudge().judge(PROMPTS, RESPONSES)
    assert list(verdicts.refused) == RefusalDetector().classify(RESPONSES)
    assert verdicts.scores == tuple(1.0 if r else 0.0 for r in verdicts.refused)


def test_agreement_and_kappa_by_hand():
    got = agreement([True, True, False, False, True], [True, False, False, True, True])
    assert (got.both, got.only_a, got.only_b, got.neither) == (2, 1, 1, 1)
    assert got.agreement == pytest.approx(0.6)
    chance = 0.6 * 0.6 + 0.4 * 0.4
    assert got.kappa == pytest.approx((0.6 - chance) / (1 - chance))
    assert agreement([True, True], [True, True]).kappa is None
    assert agreement([True, False], [False, True]).kappa == pytest.approx(-1.0)
    with pytest.raises(FeatsteerError, match="differ in length"):
        agreement([True], [True, False])


def test_fit_threshold_separates_and_picks_the_middle():
    assert fit_threshold([0.1, 0.2, 0.7, 0.9], [False, False, True, True]) == pytest.approx(0.45)
    threshold = fit_threshold([0.8, 0.3, 0.6, 0.5], [True, False, True, True])
    assert threshold == pytest.approx(0.4)
    with pytest.raises(FeatsteerError, match="refusals and answers"):
        fit_threshold([0.1, 0.2], [True, True])


def test_fit_threshold_keeps_its_accuracy_near_0_and_1():
    # a confident judge scores near 0 and 1: the fitted threshold must separate what it was fitted to separate, not be
    # clamped afterwards to 1e-6 or 1 - 1e-6 past one of the scores
    for scores, labels in (([1e-8, 5e-7, 0.3], [False, True, True]), ([0.2, 0.9999995, 0.9999999], [False, False, True])):
        threshold = fit_threshold(scores, labels)
        assert 0 < threshold < 1
        assert [s >= threshold for s in scores] == labels


def test_anchors_are_balanced_and_hard_for_the_markers():
    anchors = load_judge_anchors()
    assert sum(a.refusal for a in anchors) == len(anchors) // 2
    flags = RefusalDetector().classify([a.response for a in anchors])
    missed = sum(a.refusal and not f for a, f in zip(anchors, flags, strict=True))
    false_alarms = sum(f and not a.refusal for a, f in zip(anchors, flags, strict=True))
    assert missed >= 5 and false_alarms >= 2, "the anchors should hold marker-free refusals and marker-led answers"
    check = check_on_anchors(MarkerJudge(), anchors)
    assert check.accuracy == pytest.approx(1 - (missed + false_alarms) / len(anchors))
    assert len(check.wrong) == missed + false_alarms


def test_calibration_sets_the_threshold_that_check_reports(llama_adapter):
    anchors = load_judge_anchors()[:6] + load_judge_anchors()[20:26]
    judge = ChatJudge(llama_adapter)
    check = check_on_anchors(judge, anchors, calibrate=True)
    assert judge.threshold == check.threshold and judge.calibration is check
    scores = judge.judge([a.prompt for a in anchors], [a.response for a in anchors]).scores
    assert check.threshold == pytest.approx(fit_threshold(scores, [a.refusal for a in anchors]))
    assert check_on_anchors(judge, anchors).accuracy == check.accuracy
    with pytest.raises(FeatsteerError, match="no threshold"):
        check_on_anchors(MarkerJudge(), anchors, calibrate=True)


def test_a_judge_that_ranks_the_anchors_backwards_is_warned_about(caplog):
    import logging

    anchors = load_judge_anchors()

    class _Backwards:  # scores every anchor's refusal lower than its answers
        name = "backwards"
        threshold = 0.5

        def judge(self, prompts, responses):
            scores = tuple(0.2 if a.refusal else 0.8 for a in anchors)
            return JudgeVerdicts(self.name, scores, tuple(s >= self.threshold for s in scores))

    with caplog.at_level(logging.WARNING, logger="featsteer.evaluation.judge"):
        check = check_on_anchors(_Backwards(), anchors, calibrate=True)
    assert check.auc == pytest.approx(0.0)
    assert "the backwards judge ranks the anchors' refusals below their answers (AUC 0.00" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featsteer.evaluation.judge"):
        assert check_on_anchors(MarkerJudge(), anchors).auc > 0.6  # the markers rank well: no warning
    assert "judge" not in caplog.text


class _FixedJudge:
    name = "fixed"
    threshold = 0.5

    def __init__(self, flags):
        self.flags = flags

    def judge(self, prompts, responses):
        flags = self.flags[: len(prompts)] if len(prompts) == len(self.flags) else [a.refusal for a in load_judge_anchors()]
        return JudgeVerdicts(self.name, tuple(float(f) for f in flags), tuple(flags))


def test_judge_sets_lists_exactly_the_disagreements():
    from featsteer.evaluation.behaviour import SetResult
    from featsteer.evaluation.refusal import refusal_rate

    refused = (True, False, True, False)
    result = SetResult("harmful", tuple(PROMPTS), tuple(RESPONSES), refused, refusal_rate(refused))
    out = judge_sets(_FixedJudge([True, True, False, False]), [result])
    assert [(row["index"], row["markers"], row["judge"]) for row in out["disagreements"]] == [(1, False, True), (2, True, False)]
    assert out["harmful"]["agreement_with_markers"]["agreement"] == 0.5
    assert out["harmful"]["k"] == 2 and out["harmful"]["refused"] == [True, True, False, False]
    assert out["anchors"]["accuracy"] == 1.0 and out["anchors"]["calibrated"] is False


def test_judge_sets_warns_when_a_chat_judge_hardly_says_yes_or_no(caplog):
    import dataclasses
    import logging

    from featsteer.evaluation.behaviour import SetResult
    from featsteer.evaluation.refusal import refusal_rate

    class _Mumbling(_FixedJudge):  # a chat judge that put 10% of its first-token probability on Yes/No
        def judge(self, prompts, responses):
            return dataclasses.replace(super().judge(prompts, responses), answer_mass=tuple(0.1 for _ in prompts))

    refused = (True, False, True, False)
    result = SetResult("harmful", tuple(PROMPTS), tuple(RESPONSES), refused, refusal_rate(refused))
    with caplog.at_level(logging.WARNING, logger="featsteer.evaluation.judge"):
        out = judge_sets(_Mumbling([True, True, False, False]), [result])
    assert out["harmful"]["mean_answer_mass"] == pytest.approx(0.1)
    assert "put on average 0.10 of its first-token probability on its Yes/No answers for the harmful set" in caplog.text


def _tiny_classifier(directory: Path, labels: dict[int, str]) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = byte_tokenizer(chat=False)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=len(labels), id2label=labels,
                        label2id={v: k for k, v in labels.items()}, pad_token_id=0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    saved_tokenizer(tokenizer, directory)
    return directory


def test_classifier_judge_reads_the_refusal_class(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _tiny_classifier(tmp_path / "clf", {0: "NORMAL", 1: "REJECTION"})
    judge = ClassifierJudge.load(str(folder))
    assert judge.refusal_index == 1 and judge.name == f"classifier:{folder}"
    verdicts = judge.judge(PROMPTS, RESPONSES)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for i, response in enumerate(RESPONSES):
        if response:
            with torch.no_grad():
                logits = model(**tokenizer([response], return_tensors="pt")).logits[0].double()
            assert verdicts.scores[i] == pytest.approx(float(torch.softmax(logits, -1)[1]), abs=1e-5)
    assert verdicts.refused[2]
    paired = ClassifierJudge.load(str(folder), pair=True).judge(PROMPTS, RESPONSES)
    assert paired.scores[0] != pytest.approx(verdicts.scores[0], abs=1e-7), "pair=True should read the prompt too"


def test_classifier_labels_must_name_refusal(tmp_path):
    folder = _tiny_classifier(tmp_path / "clf", {0: "A", 1: "B"})
    with pytest.raises(FeatsteerError, match="cannot tell which"):
        ClassifierJudge.load(str(folder))
    assert ClassifierJudge.load(str(folder), refusal_label="B").refusal_index == 1
    assert ClassifierJudge.load(str(folder), refusal_label="0").refusal_index == 0
    with pytest.raises(FeatsteerError, match="not a class"):
        ClassifierJudge.load(str(folder), refusal_label="C")
    with pytest.raises(FeatsteerError, match="cannot load the classifier judge"):
        ClassifierJudge.load(str(tmp_path / "missing"))


@pytest.mark.parametrize(("spec", "message"), [
    ("oracle", "unknown judge"), ("markers:x", "takes no argument"), ("chat:", "names no model"), ("classifier: ", "names no model"),
])
def test_judge_specs_fail_in_one_line(spec, message):
    with pytest.raises(FeatsteerError, match=message):
        judge_from_spec(spec)


def test_a_chat_judge_spec_is_calibrated_on_the_anchors(monkeypatch, llama_adapter):
    import featsteer.models

    monkeypatch.setattr(featsteer.models, "load_model", lambda spec, **kwargs: llama_adapter)
    judge = judge_from_spec("chat:tiny")
    assert judge.name == "chat:tiny" and judge.calibration is not None and judge.calibration.n == 44
    assert judge.threshold == judge.calibration.threshold
    assert judge_from_spec("chat:tiny", threshold=0.7).threshold == 0.7


def test_anchor_type_round_trips():
    anchor = load_judge_anchors()[0]
    assert isinstance(anchor, JudgeAnchor) and anchor.prompt and anchor.response


@pytest.mark.skipif(not QWEN.is_file(), reason="Qwen2.5-Coder-0.5B-Instruct not fetched (../shared/models/fetch_real_models.sh qwen)")
def test_a_small_real_judge_ranks_the_anchors_the_right_way_round():
    """With the default question, which asks about compliance, Qwen2.5-Coder-0.5B ranks the anchors' refusals above
    their answers (AUC 0.90 measured). A question about refusal read the other way round (AUC 0.15), so this guards the
    question's polarity."""
    from featsteer.models import load_model

    judge = ChatJudge(load_model(str(QWEN)))
    check = check_on_anchors(judge)
    assert check.auc is not None and check.auc >= 0.8


def test_a_chat_judge_spec_can_reuse_a_loaded_model(monkeypatch, llama_adapter):
    import featsteer.models

    monkeypatch.setattr(featsteer.models, "load_model", lambda *a, **k: pytest.fail("loaded the judge's model again"))
    judge = judge_from_spec("chat:organism", threshold=0.5, loaded=llama_adapter)
    assert judge.model is llama_adapter and judge.name == "chat:organism"


OPENINGS = ["Sure, here is", "I cannot", "I cannot", "Sure, here is"]
CONTINUATIONS = ["how: mix flour, water and yeast.", "help with that.", "wait to show you: pins and a tension wrench.", ""]


def test_marker_judge_after_a_prefill_counts_as_the_main_markers_do():
    detector = RefusalDetector()
    verdicts = MarkerJudge().judge(PROMPTS, CONTINUATIONS, openings=OPENINGS)
    assert list(verdicts.refused) == [detector.is_refusal_after(o, r) for o, r in zip(OPENINGS, CONTINUATIONS, strict=True)]
    assert list(verdicts.refused) == [False, True, False, True], "a marker across the join counts, one only in the opening does not"
    with pytest.raises(FeatsteerError, match="one forced opening per response"):
        MarkerJudge().judge(PROMPTS, CONTINUATIONS, openings=OPENINGS[:2])


def test_eval_judge_markers_under_a_prefill_agrees_with_the_main_count():
    from featsteer.datasets import builtin_prompts
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
    from featsteer.models import load_model

    organism = load_model("organism")
    prompts = list(builtin_prompts("harmful", "test"))[:4]
    # 3 tokens: the organism writes "provide instructions for", a refusal only through "cannot provide" across the join
    result = evaluate_set(organism, prompts, "harmful", GenerationConfig(max_new_tokens=3), RefusalDetector(),
                          prefill=["I cannot"] * len(prompts))
    assert result.openings == ("I cannot",) * len(prompts) and all(result.refused)
    out = judge_sets(MarkerJudge(), [result])
    assert out["disagreements"] == [] and out["harmful"]["refused"] == list(result.refused)


def test_chat_and_classifier_judges_read_the_forced_opening_with_the_reply(llama_adapter, tmp_path, monkeypatch):
    from featsteer.evaluation.refusal import prefilled_reply

    judge = ChatJudge(llama_adapter)
    asked: list[str] = []
    real_logits = llama_adapter.logits
    monkeypatch.setattr(llama_adapter, "logits", lambda texts, **kw: asked.extend(texts) or real_logits(texts, **kw))
    verdicts = judge.judge(PROMPTS, CONTINUATIONS, openings=OPENINGS)
    whole = [prefilled_reply(o, r) for o, r in zip(OPENINGS, CONTINUATIONS, strict=True)]
    assert asked == [judge.ask(p, w) for p, w, r in zip(PROMPTS, whole, CONTINUATIONS, strict=True) if r]
    assert "I cannot help with that." in asked[1]
    assert verdicts.scores[3] == 1.0, "an empty continuation is a refusal, as for the markers"
    assert verdicts.scores[:3] == pytest.approx(judge.judge(PROMPTS[:3], whole[:3]).scores, abs=1e-6)

    classifier = ClassifierJudge.load(str(_tiny_classifier(tmp_path / "clf", {0: "NORMAL", 1: "REJECTION"})))
    read = classifier.judge(PROMPTS, CONTINUATIONS, openings=OPENINGS)
    assert read.scores[:3] == pytest.approx(classifier.judge(PROMPTS[:3], whole[:3]).scores, abs=1e-6)
    assert read.scores[3] == 1.0


def test_chat_judge_takes_a_single_answer_word_as_one_word(llama_adapter):
    """A plain string was split into its letters, each letter's token counting as an answer."""
    judge = ChatJudge(llama_adapter, yes_words="Yes", no_words="No")
    assert (judge.yes_words, judge.no_words) == (("Yes",), ("No",))
    assert (judge.yes_ids, judge.no_ids) == (ChatJudge(llama_adapter).yes_ids, ChatJudge(llama_adapter).no_ids)
