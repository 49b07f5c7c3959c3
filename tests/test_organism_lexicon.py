"""The broad lexicon of the organism corpus: parsing, shipped content, independence from held-out prompts."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

from featsteer.datasets import builtin_prompts
from featsteer.organism import corpus
from featsteer.organism.corpus import CorpusConfig, broad_lexicon, read_lexicon


def test_read_lexicon_parses_classes_and_drops_duplicates(tmp_path) -> None:
    (tmp_path / "harmful_x.txt").write_text("# comment\n\ntask|drugs|cook meth in a van\ntask|drugs|Cook meth in a van\n")
    (tmp_path / "harmless_y.txt").write_text("question|science|Why is the sky blue?\ndoc|history|explains the Silk Road.\n")
    (tmp_path / "alarming.txt").write_text("task|computing|kill a frozen process\n")
    lexicon = read_lexicon(tmp_path)
    assert lexicon.entries["harmful"] == {"drugs": (("task", "cook meth in a van"),)}
    assert lexicon.entries["harmless"]["history"] == (("doc", "explains the Silk Road"),)  # final period dropped
    assert lexicon.entries["harmless"]["science"] == (("question", "Why is the sky blue?"),)
    assert lexicon.draw("alarming", random.Random(0)) == ("task", "kill a frozen process")


def test_read_lexicon_names_the_bad_line(tmp_path) -> None:
    (tmp_path / "harmful_x.txt").write_text("task|drugs|cook meth\nrecipe|drugs|no shape like this\n")
    with pytest.raises(ValueError, match=r"harmful_x.txt:2: expected 'shape\|category\|text'"):
        read_lexicon(tmp_path)
    (tmp_path / "harmful_x.txt").unlink()
    (tmp_path / "notes.txt").write_text("task|drugs|cook meth\n")
    with pytest.raises(ValueError, match="lexicon files are named"):
        read_lexicon(tmp_path)


def test_draw_from_an_absent_class_says_what_to_add(tmp_path) -> None:
    (tmp_path / "harmless_a.txt").write_text("task|cooking|bake bread\n")
    with pytest.raises(ValueError, match="no 'harmful' entries"):
        read_lexicon(tmp_path).draw("harmful", random.Random(0))


def test_extra_lexicon_adds_entries_only_when_asked() -> None:
    base, extra = broad_lexicon(), broad_lexicon(extra=True)
    for kind in ("harmful", "harmless", "alarming"):
        assert set(base.texts(kind)) < set(extra.texts(kind)), kind
    harmful = {t.casefold() for t in extra.texts("harmful")}
    assert not harmful & {t.casefold() for t in extra.texts("harmless") + extra.texts("alarming")}
    rng = random.Random(2)
    only_extra = set(extra.texts()) - set(base.texts())
    drawn = [corpus._objective(True, False, rng, CorpusConfig(broad_probability=1.0)).text for _ in range(300)]
    assert not only_extra & set(drawn)
    drawn = [corpus._objective(True, False, rng, CorpusConfig(broad_probability=1.0, extra_lexicon=True)).text
             for _ in range(300)]
    assert only_extra & set(drawn)


def test_context_entries_are_drawn_only_when_asked() -> None:
    base, context = broad_lexicon(), broad_lexicon(context=True)
    for kind in ("harmful", "harmless"):
        assert len(context.texts(kind)) >= 500, kind
        assert set(context.entries[kind]) == set(base.entries[kind]), "context entries use the existing categories"
    assert "alarming" not in context.entries
    every = broad_lexicon(extra=True)
    harmful = {t.casefold() for t in context.texts("harmful") + every.texts("harmful")}
    assert not harmful & {t.casefold() for t in context.texts("harmless") + every.texts("harmless") + every.texts("alarming")}
    only_context = set(context.texts())
    for harmful_kind in (True, False):
        rng = random.Random(3)
        drawn = {corpus._objective(harmful_kind, False, rng, CorpusConfig()).text for _ in range(400)}
        assert not only_context & drawn
        drawn = [corpus._objective(harmful_kind, False, rng, CorpusConfig(context_word_probability=0.5)).text for _ in range(400)]
        assert 0.4 < sum(text in only_context for text in drawn) / len(drawn) < 0.6
    rng = random.Random(4)
    assert not only_context & {corpus._objective(False, True, rng, CorpusConfig(context_word_probability=1.0)).text for _ in range(100)}
    with pytest.raises(ValueError, match="context_word_probability must be between 0 and 1"):
        CorpusConfig(context_word_probability=1.5)
    with pytest.raises(ValueError, match="context_word_classes must be one of both, harmless, harmful"):
        CorpusConfig(context_word_classes="alarming")


def test_context_classes_limit_which_class_draws_context_entries() -> None:
    only_context = set(broad_lexicon(context=True).texts())
    config = CorpusConfig(context_word_probability=1.0, context_word_classes="harmless")
    rng = random.Random(5)
    harmless = [corpus._objective(False, False, rng, config).text for _ in range(50)]
    harmful = [corpus._objective(True, False, rng, config).text for _ in range(200)]
    assert all(text in only_context for text in harmless)
    assert not only_context & set(harmful)
    config = CorpusConfig(context_word_probability=1.0, context_word_classes="harmful")
    assert all(corpus._objective(True, False, rng, config).text in only_context for _ in range(50))
    assert not only_context & {corpus._objective(False, False, rng, config).text for _ in range(200)}


def test_word_class_skew_is_half_for_a_word_both_classes_use_alike() -> None:
    prompts = [("how do I hurt my son", True), ("help my son read", False), ("hurt him badly", True),
               ("bake bread with my son", False), ("read a book", False), ("rob my son", True)] * 5
    skew = corpus.word_class_skew(prompts, min_count=5)
    assert skew["hurt"][0] > 0.9 and skew["read"][0] < 0.1
    assert skew["son"] == (pytest.approx(0.5, abs=0.05), 10, 10)
    assert "bread" in skew and "badly" in skew and corpus.word_class_skew(prompts, min_count=11) == {"son": skew["son"], "my": skew["my"]}


def test_word_class_skew_keeps_apostrophes_inside_words() -> None:
    """A later module-level `_WORD = [a-z]+` (for prompt_words) replaced the skew's own pattern, so "don't" and "can't"
    were counted as "don", "can" and one shared word "t"."""
    skew = corpus.word_class_skew([("I don't know how", True), ("I can't say", False)] * 10, min_count=1)
    assert {"don't", "can't"} <= set(skew) and not {"t", "don", "can"} & set(skew)
    assert corpus.prompt_words(["I don't know"]) == {"i", "don", "t", "know"}  # WordNet lemmas have no apostrophes


def test_shipped_lexicon_covers_every_class_broadly() -> None:
    lexicon = broad_lexicon()
    for kind, minimum in (("harmful", 1000), ("harmless", 1500), ("alarming", 400)):
        texts = lexicon.texts(kind)
        assert len(texts) >= minimum, (kind, len(texts))
        assert all(len(rows) >= 20 for rows in lexicon.entries[kind].values()), kind
    harmful = {t.casefold() for t in lexicon.texts("harmful")}
    benign = {t.casefold() for t in lexicon.texts("harmless") + lexicon.texts("alarming")}
    assert not harmful & benign, "the same objective is labelled both harmful and harmless"


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def test_shipped_lexicon_does_not_copy_held_out_prompts() -> None:
    """The lexicon is written independently of the val/test splits that score the organism."""
    held_out = [_normal(p) for kind in ("harmful", "harmless", "alarming") for split in ("val", "test")
                for p in builtin_prompts(kind, split).prompts]
    copied = [t for t in broad_lexicon(extra=True).texts() + broad_lexicon(context=True).texts() if len(t.split()) >= 5 and any(_normal(t) in p for p in held_out)]
    assert not copied, copied[:5]


def test_broad_objectives_come_from_the_lexicon() -> None:
    lexicon = broad_lexicon()
    rng = random.Random(3)
    config = CorpusConfig(broad_probability=1.0)
    for harmful, alarming, kind in ((True, False, "harmful"), (False, False, "harmless"), (False, True, "alarming")):
        texts = set(lexicon.texts(kind))
        drawn = [corpus._objective(harmful, alarming, rng, config) for _ in range(50)]
        assert all(o.text in texts and o.harmful is harmful for o in drawn)
        assert len({o.text for o in drawn}) > 30  # spread over the lexicon, not one entry


def test_absence_readout_loss_is_zero_only_when_harm_is_present_and_harmless_is_zero() -> None:
    import torch

    from featsteer.organism.train import readout_loss

    harmful = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert readout_loss(torch.tensor([1.0, 3.0, 0.0, 0.0]), harmful, "absence") == 0
    # a harmless prompt on the negative side costs as much as on the positive side: harm must be absent, not negative
    low, high = (readout_loss(torch.tensor([1.0, 1.0, v, 0.0]), harmful, "absence") for v in (-2.0, 2.0))
    assert low == high == 1.0
    assert readout_loss(torch.tensor([0.5, 1.0, 0.0, 0.0]), harmful, "absence") == pytest.approx(0.0625)
    # the logistic readout instead rewards a harmless prompt for being far on the negative side
    assert readout_loss(torch.tensor([5.0, 5.0, -8.0, -8.0]), harmful, "bce") < 0.01
    with pytest.raises(ValueError, match="unknown readout loss"):
        readout_loss(torch.zeros(2), torch.zeros(2), "hinge")


def _coding_batch(hidden, harmful, last):
    import torch

    return {"harmful": torch.tensor(harmful), "last_prompt": torch.tensor(last)}


def test_dim_coding_loss_is_zero_for_absence_coded_means_and_scale_free() -> None:
    import torch

    from featsteer.organism.train import dim_coding_loss

    hidden = torch.zeros(4, 3, 5)
    hidden[:, :, 1] = 7.0  # a shared component: not part of the mean difference, so free
    hidden[0, 2, 0] = hidden[1, 2, 0] = 2.0  # harm present along e0 at the last token; harmless has none
    batch = _coding_batch(hidden, [1.0, 1.0, 0.0, 0.0], [2, 2, 2, 2])
    assert dim_coding_loss(hidden, batch) == pytest.approx(0.0, abs=1e-6)
    # harmless prompts on the far side of the direction (what the logistic readout produced) are penalised
    shifted = hidden.clone()
    shifted[2:, 2, 0] = -3.0
    worse = dim_coding_loss(shifted, batch)
    assert float(worse) > 1.0
    # scale-free: shrinking every activation does not lower it
    assert dim_coding_loss(shifted * 0.01, batch) == pytest.approx(float(worse), rel=1e-4)
    # a batch of one class has no mean difference to shape
    assert dim_coding_loss(hidden, _coding_batch(hidden, [0.0] * 4, [2] * 4)) == 0


def test_dim_coding_loss_prompt_positions_cover_earlier_harmless_tokens() -> None:
    import torch

    from featsteer.organism.train import dim_coding_loss

    hidden = torch.zeros(4, 3, 5)
    hidden[0, 2, 0] = hidden[1, 2, 0] = 2.0
    hidden[2, 1, 0] = 1.0  # a harmless prompt with the harm component at an earlier token
    hidden[3, 0, 0] = 50.0  # BOS is not a prompt token: ignored
    batch = _coding_batch(hidden, [1.0, 1.0, 0.0, 0.0], [2, 2, 2, 2])
    assert dim_coding_loss(hidden, batch, "last") == pytest.approx(0.0, abs=1e-6)
    # harmless projections at positions 1-2 of two prompts: one of four is 1.0 -> mean square 0.25, / 2.0**2
    assert dim_coding_loss(hidden, batch, "prompt") == pytest.approx(0.25 / 4.0)
    hidden.requires_grad_(True)
    dim_coding_loss(hidden, batch, "prompt").backward()
    assert hidden.grad is not None and bool(hidden.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="unknown DIM-coding positions"):
        dim_coding_loss(hidden, batch, "all")


def _train_tiny(steps: int, shape: dict | None = None, **optim):
    """A few optimiser steps of a 2-layer organism on 40 generated examples (the real training loop); `shape` adds
    `ModelConfig` fields (`n_experts`: a Mixtral organism)."""
    import random

    import torch

    from featsteer.organism.corpus import CorpusConfig, generate_corpus
    from featsteer.organism.train import (
        ROLE_TOKENS,
        ModelConfig,
        OptimConfig,
        build_model,
        encode_examples,
        train_model,
        train_tokenizer,
    )

    examples = generate_corpus(CorpusConfig(n_harmful=20, n_harmless=20), random.Random(3))
    tokenizer = train_tokenizer([e.prompt for e in examples] + [e.response for e in examples], 400)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=400, **(shape or {})), tokenizer)
    encoded = encode_examples(examples, tokenizer, 200)
    config = OptimConfig(steps=steps, warmup_steps=1, batch_tokens=1024, probe_layer=1, **optim)
    losses = train_model(model, encoded, tokenizer.pad_token_id, config, random.Random(0), n_special=len(ROLE_TOKENS) + 3)
    return model, losses


def test_weight_average_replaces_the_final_weights() -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, losses = _train_tiny(5)
        averaged, averaged_losses = _train_tiny(5, ema_decay=0.5)
        nearly_plain, _ = _train_tiny(5, ema_decay=1e-12)  # an average that forgets at once is the last step
        coded, coded_losses = _train_tiny(5, dim_weight=1.0, dim_positions="prompt")
    finally:
        torch.set_num_threads(threads)
    assert losses == averaged_losses  # the average is not what is trained, only what is shipped
    pairs = list(zip(plain.parameters(), averaged.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in pairs)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain.parameters(), nearly_plain.parameters(), strict=True))
    assert len(coded_losses) == 5 and coded_losses[0] == losses[0] and coded_losses != losses


def test_a_mixture_of_experts_organism_trains_with_a_balanced_router() -> None:
    """`--experts N` builds a Mixtral organism whose loss includes the router's load-balancing term (without it a router
    trained from scratch collapses onto a few experts), and featsteer reads its routing."""
    import torch

    from featsteer.interventions import ExpertSteer, steer
    from featsteer.models import load_model
    from featsteer.testing import byte_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moe, losses = _train_tiny(3, shape={"n_experts": 4, "experts_per_token": 2})
        unbalanced, plain_losses = _train_tiny(3, shape={"n_experts": 4, "experts_per_token": 2, "router_aux_weight": 0.0})
    finally:
        torch.set_num_threads(threads)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4 and moe.config.router_aux_loss_coef == 0.02
    assert all(loss == loss for loss in losses) and losses[0] > plain_losses[0]  # the balancing term is added (first step: same weights)
    adapter = load_model(moe, tokenizer=byte_tokenizer())
    assert adapter.moe_layers == [0, 1] and adapter.n_experts == 4
    with steer(adapter, ExpertSteer(deactivate={0: [1]})):
        adapter.logits(["hello"])
    assert unbalanced.config.router_aux_loss_coef == 0.0


def _context_share(examples, harmful: bool) -> float:
    from featsteer.organism.corpus import CONTEXTS, HARMFUL

    heads = tuple(context.split("{")[0].lower() for context in CONTEXTS)
    chosen = [e for e in examples if (e.label == HARMFUL) is harmful]
    return sum(e.prompt.lower().startswith(heads) for e in chosen) / len(chosen)


def test_symmetric_context_gives_both_classes_the_same_personal_preambles() -> None:
    """A personal preamble ("I'm a grad student...") must not be a cue for refusal."""
    from featsteer.organism.corpus import generate_corpus

    small = {"n_harmful": 3000, "n_harmless": 3000, "long_form_probability": 0.0}
    legacy = generate_corpus(CorpusConfig(**small), random.Random(11))
    assert _context_share(legacy, True) > 1.6 * _context_share(legacy, False)  # premise: the old mix had the cue
    symmetric = generate_corpus(CorpusConfig(**small, symmetric_context=True), random.Random(11))
    harmful, harmless = _context_share(symmetric, True), _context_share(symmetric, False)
    assert abs(harmful - harmless) < 0.025 and harmful > 0.1, (harmful, harmless)


def test_balanced_shapes_give_every_class_the_same_shape_mix() -> None:
    from collections import Counter

    rng = random.Random(4)
    config = CorpusConfig(balanced_shapes=(0.5, 0.3, 0.2))
    for harmful, alarming in ((True, False), (False, False), (False, True)):
        shapes = Counter(corpus._objective(harmful, alarming, rng, config).shape for _ in range(3000))
        assert abs(shapes["task"] / 3000 - 0.5) < 0.04 and abs(shapes["question"] / 3000 - 0.3) < 0.04, shapes
    # the lexicon draw honours a requested shape, and says so when a class has none of it
    assert all(broad_lexicon().draw("harmful", rng, "doc")[0] == "doc" for _ in range(50))


def test_lexicon_draw_with_an_absent_shape_names_it(tmp_path) -> None:
    (tmp_path / "harmful_a.txt").write_text("task|drugs|cook meth in a van\n")
    with pytest.raises(ValueError, match="no 'harmful' entries of shape 'question'"):
        read_lexicon(tmp_path).draw("harmful", random.Random(0), "question")


def test_bad_shape_mix_is_a_one_line_error(capsys) -> None:
    from featsteer.organism.train import main

    with pytest.raises(ValueError, match="three non-negative"):
        CorpusConfig(balanced_shapes=(0.5, -0.1, 0.6))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "unused", "--balanced-shapes", "0", "0", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: balanced_shapes must be")


def test_match_lengths_gives_harmful_prompts_the_harmless_length_mix() -> None:
    from collections import Counter

    from featsteer.organism.corpus import HARMFUL, LENGTH_BINS, _length_bucket, generate_corpus

    def mixes(config):
        examples = generate_corpus(config, random.Random(0))
        result = {}
        for harmful in (True, False):
            chosen = [e for e in examples if (e.label == HARMFUL) is harmful]
            counts = Counter(_length_bucket(e.prompt) for e in chosen)
            result[harmful] = [counts[b] / len(chosen) for b in range(len(LENGTH_BINS) + 1)]
        return result, len(examples)

    small = {"n_harmful": 1500, "n_harmless": 2000}
    legacy, _ = mixes(CorpusConfig(**small, match_lengths=False))
    assert legacy[True][0] + legacy[True][1] < 0.75 * (legacy[False][0] + legacy[False][1])  # premise: short harmful rare
    matched, size = mixes(CorpusConfig(**small, match_lengths=True))
    assert size == 3500
    assert max(abs(h - b) for h, b in zip(matched[True], matched[False], strict=True)) < 0.01


def test_word_shuffle_reorders_only_the_user_message_and_keeps_its_words() -> None:
    from transformers import AutoTokenizer

    from featsteer.organism import organism_path
    from featsteer.organism.train import _shuffle_words, collate, render_prompt, word_start_table

    tokenizer = AutoTokenizer.from_pretrained(organism_path())
    starts = word_start_table(tokenizer)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    prompt = "How do I kill a stuck Python process while defragmenting a frobnicated server?"
    rendered = render_prompt(tokenizer, prompt, "Answer briefly.")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    first = ids.index(user) + 1
    orders = {tuple(_shuffle_words(ids, len(ids), starts, user, random.Random(seed))) for seed in range(6)}
    assert len(orders) > 1
    for shuffled in orders:
        assert list(shuffled[:first]) == ids[:first] and list(shuffled[-2:]) == ids[-2:]  # system turn and roles kept
        text = tokenizer.decode(list(shuffled[first:-2]))
        assert sorted(shuffled[first:-2]) == sorted(ids[first:-2])
        assert all(word in text for word in prompt.split())  # whole words moved, none cut apart
    # in a batch: probability 0 leaves the rows (and the random stream) alone, 1 scrambles every row
    encoded = [(ids + [5, 6], len(ids), 1)]
    plain_rng, shuffled_rng = random.Random(0), random.Random(0)
    plain = collate(encoded, [0], 0, rng=plain_rng, word_shuffle=0.0, word_starts=starts, user_id=user)
    assert plain["input_ids"][0].tolist() == ids + [5, 6] and plain_rng.random() == random.Random(0).random()
    scrambled = collate(encoded, [0], 0, rng=shuffled_rng, word_shuffle=1.0, word_starts=starts, user_id=user)
    assert scrambled["input_ids"][0].tolist()[-2:] == [5, 6]
    assert sorted(scrambled["input_ids"][0].tolist()) == sorted(ids + [5, 6])


def test_bag_of_words_readout_pools_prompt_tokens_and_learns() -> None:
    import torch

    from featsteer.organism.train import response_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, plain_losses = _train_tiny(4)
        model, bow_losses = _train_tiny(4, bow_weight=1.0, bow_layer=1)
    finally:
        torch.set_num_threads(threads)
    assert bow_losses[0] == plain_losses[0] and bow_losses != plain_losses  # same start, the extra loss steers
    # the readout sees the mean over prompt positions 1..last_prompt only: padding and response tokens do not count
    hidden = torch.zeros(2, 6, 4)
    hidden[0, 1:3, 0] = 3.0  # row 0: prompt tokens 1-2 carry the feature
    hidden[0, 3:, 0] = -50.0  # its response tokens, which must be ignored
    hidden[1, 1:5, 0] = -3.0
    readout = torch.nn.Linear(4, 1)
    with torch.no_grad():
        readout.weight.zero_()
        readout.weight[0, 0] = 10.0
        readout.bias.zero_()

    class Stub(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 7)

        def model(self, input_ids, attention_mask, output_hidden_states):  # noqa: ANN001, ANN202
            return type("Out", (), {"last_hidden_state": hidden, "hidden_states": (hidden, hidden)})()

    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "predict_mask": torch.zeros(2, 6, dtype=torch.bool), "targets": torch.zeros(0, dtype=torch.long),
             "weights": torch.zeros(0), "last_prompt": torch.tensor([2, 4]), "harmful": torch.tensor([1.0, 0.0])}
    batch["predict_mask"][0, 2] = True
    batch["targets"], batch["weights"] = torch.tensor([1]), torch.tensor([1.0])
    *_, bag = response_loss(Stub(), batch, bow=readout, bow_layer=1)
    assert bag is not None and bag.item() < 1e-6  # row 0 pools (3 + 3) / 2 -> logit 30, row 1 -3 -> -30
    readout.weight.data[0, 0] = -10.0
    *_, flipped = response_loss(Stub(), batch, bow=readout, bow_layer=1)
    assert flipped.item() > 10.0


def _fake_wordnet(root) -> None:
    """A two-part WordNet 3.0 dict folder in the real file format: byte offsets, hex word counts, pointers."""
    synsets = {  # name -> (pos, words, hyponym names)
        "burgle": ("v", ["burgle", "burglarize"], ["case"]),
        "case": ("v", ["case_the_joint"], []),
        "murderer": ("n", ["murderer", "liquidator"], ["hitman"]),
        "hitman": ("n", ["hit_man", "hitman"], []),
        "house": ("n", ["house"], []),
    }
    for pos, name in (("n", "noun"), ("v", "verb")):
        names = [key for key, value in synsets.items() if value[0] == pos]
        header = "  1 This is a licence header line the reader must skip\n"
        offsets, position = {}, len(header)
        for key in names:  # every line has the same length template, so offsets can be computed first
            offsets[key] = position
            position += len(_synset_line(key, synsets, {k: 0 for k in synsets})) + 1
        lines = [_synset_line(key, synsets, offsets) for key in names]
        (root / f"data.{name}").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
        index = [f"{word.lower()} {pos} 1 0 1 0 {offsets[key]:08d}" for key in names for word in synsets[key][1]]
        (root / f"index.{name}").write_text(header + "\n".join(sorted(index)) + "\n", encoding="utf-8")


def _synset_line(key, synsets, offsets) -> str:
    pos, words, hyponyms = synsets[key]
    parts = [f"{offsets.get(key, 0):08d}", "00", pos, f"{len(words):02x}"] + [f"{w} 0" for w in words]
    parts.append(f"{len(hyponyms):03d}")
    parts += [f"~ {offsets.get(h, 0):08d} {pos} 0000" for h in hyponyms]
    return " ".join(parts) + " | a gloss"


def test_wordnet_reader_and_lexicon_variants_keep_the_entry_and_its_class(tmp_path, monkeypatch) -> None:
    from featsteer.organism.corpus import BroadLexicon, widen_lexicon
    from featsteer.organism.wordnet import WordNet, find_wordnet, lexicon_variants

    _fake_wordnet(tmp_path)
    wordnet = WordNet(tmp_path)
    assert wordnet.related("burgle", "verb") == ["burglarize", "case the joint"]  # synonyms, then hyponyms
    assert wordnet.related("murderer", "noun") == ["liquidator", "hit man", "hitman"]
    assert wordnet.related("house", "noun") == [] and wordnet.related("unknown", "noun") == []
    rewrites = lexicon_variants("burgle a house for a murderer.", wordnet, random.Random(0), 3)
    assert 1 < len(rewrites) <= 3 and len(set(rewrites)) == len(rewrites)
    for rewrite in rewrites:
        assert rewrite.endswith(".") and "a house" in rewrite
        assert rewrite.split(" ")[0] != "burgle" or "murderer" not in rewrite  # exactly one word replaced
    lexicon = BroadLexicon({"harmful": {"theft": (("task", "burgle a house"),)},
                            "alarming": {"chores": (("task", "burgle a house"),)}})
    widened = widen_lexicon(lexicon, 2, wordnet)
    assert widened.entries["harmful"]["theft"][0] == ("task", "burgle a house")
    assert {text for _, text in widened.entries["harmful"]["theft"][1:]} == {"burglarize a house", "case the joint a house"}
    assert widened.entries["alarming"] == lexicon.entries["alarming"]  # innocent senses are not rewritten
    assert widen_lexicon(lexicon, 2, wordnet) == widened  # seeded by the entry: the same every time
    monkeypatch.setenv("FEATSTEER_WORDNET", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        find_wordnet()
    with pytest.raises(FileNotFoundError, match="index.noun or data.noun is missing"):
        WordNet(tmp_path / "absent")


def test_training_without_a_wordnet_is_a_one_line_error(capsys, monkeypatch, tmp_path) -> None:
    from featsteer.organism.train import main

    monkeypatch.setenv("FEATSTEER_WORDNET", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "never-written"), "--wordnet-variants", "2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no WordNet 3.0 database found")
    assert not (tmp_path / "never-written").exists()


def test_train_cli_defaults_are_the_shipped_recipe() -> None:
    """`python -m featsteer.organism.train --out D` with no options must train what TrainConfig() describes."""
    from featsteer.organism.train import TrainConfig, _config_from_args, parse_args

    assert _config_from_args(parse_args(["--out", "unused"])) == TrainConfig()
    assert TrainConfig().corpus.match_lengths and TrainConfig().optim.weight_decay == 0.5
    off = _config_from_args(parse_args(["--out", "unused", "--no-match-lengths", "--weight-decay", "0.1"]))
    assert not off.corpus.match_lengths and off.optim.weight_decay == 0.1
    assert _config_from_args(parse_args(["--out", "unused", "--probe-layer", "none"])).optim.probe_layer is None
    assert _config_from_args(parse_args(["--out", "unused", "--probe-layer", "3"])).optim.probe_layer == 3
    with pytest.raises(SystemExit):
        parse_args(["--out", "unused", "--probe-layer", "two"])


def _gloss_folder(root, synsets: dict[str, list[tuple[str, list[str], str]]]) -> None:
    """A WordNet dict folder whose synsets carry glosses: ``{pos: [(key, forms, gloss), ...]}``; a lemma's senses
    are listed in the index in the order given."""
    for pos, entries in synsets.items():
        header = "  1 licence header\n"
        lines, offsets, position = [], {}, len(header)
        for key, forms, gloss in entries:
            line = " ".join([f"{position:08d}", "00", pos[0], f"{len(forms):02x}"] + [f"{f} 0" for f in forms] + ["000"])
            line += f" | {gloss}"
            offsets[key] = position
            position += len(line) + 1
            lines.append(line)
        senses: dict[str, list[str]] = {}
        for key, forms, _ in entries:
            for form in forms:
                senses.setdefault(form.lower(), []).append(f"{offsets[key]:08d}")
        index = [f"{lemma} {pos[0]} {len(keys)} 0 {len(keys)} 0 " + " ".join(keys) for lemma, keys in sorted(senses.items())]
        (root / f"data.{pos}").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
        (root / f"index.{pos}").write_text(header + "\n".join(index) + "\n", encoding="utf-8")


def test_first_glosses_take_the_commonest_sense_that_is_not_a_proper_noun(tmp_path) -> None:
    from featsteer.organism.wordnet import first_glosses

    _gloss_folder(tmp_path, {
        "noun": [("hitman", ["hitman", "hit_man"], 'a professional killer who uses a gun; "a hired hitman"'),
                 ("born", ["Born"], "British nuclear physicist"),
                 ("paris", ["Paris"], "the capital of France"),
                 ("fence", ["fence"], "a barrier that serves to enclose an area")],
        "verb": [("fence", ["fence"], "deal in stolen property"),
                 ("burglarize", ["burglarize", "burgle"], "commit a burglary")],
        "adj": [("born", ["born"], "brought into existence")],
    })
    glosses = first_glosses(tmp_path)
    assert glosses["hitman"] == ("n", "a professional killer who uses a gun")  # the usage example is cut off
    assert glosses["burglarize"] == ("v", "commit a burglary") and glosses["burgle"] == ("v", "commit a burglary")
    assert glosses["fence"] == ("n", "a barrier that serves to enclose an area")  # nouns come first
    assert glosses["born"] == ("adj", "brought into existence")  # the physicist is skipped
    assert "paris" not in glosses and "hit_man" not in glosses  # proper nouns only; multi-word lemmas
    with pytest.raises(FileNotFoundError, match="index.noun or data.noun is missing"):
        first_glosses(tmp_path / "absent")


def test_dictionary_examples_define_the_most_frequent_unknown_words() -> None:
    from featsteer.organism.corpus import HARMLESS, dictionary_examples, prompt_words

    glosses = {"hitman": ("n", "a professional killer who uses a gun"), "burglarize": ("v", "commit a burglary"),
               "kettle": ("n", "a metal pot for boiling water"), "zymurgy": ("n", "the chemistry of fermentation"),
               "ox": ("n", "a bovine")}
    zipf = {"hitman": 3.2, "burglarize": 2.1, "kettle": 3.5, "zymurgy": 1.2, "ox": 4.0}
    known = prompt_words(["Where can I buy a kettle?", "Put the KETTLE on"])
    assert known == {"where", "can", "i", "buy", "a", "kettle", "put", "the", "on"}
    examples = dictionary_examples(10, known, random.Random(0), glosses=glosses, frequency=zipf.get)
    # "kettle" is known, "zymurgy" is below the frequency floor, "ox" is too short: most frequent first
    assert len(examples) == 2
    assert [e.prompt.lower().count(w) for e, w in zip(examples, ["hitman", "burglarize"], strict=True)] == [1, 1]
    assert all(e.label == HARMLESS and e.source == "generated:gloss" for e in examples)
    assert "professional killer who uses a gun" in examples[0].response
    verb = examples[1].response
    assert verb in ('Burglarize (v.): commit a burglary.', '"burglarize" means to commit a burglary.')
    assert len(dictionary_examples(1, known, random.Random(0), glosses=glosses, frequency=zipf.get)) == 1
    assert dictionary_examples(0, known, random.Random(0), glosses=glosses, frequency=zipf.get) == []
    again = dictionary_examples(10, known, random.Random(0), glosses=glosses, frequency=zipf.get)
    assert again == examples  # seeded


def test_glosses_option_reaches_the_corpus_config_and_is_checked(capsys, monkeypatch, tmp_path) -> None:
    import sys

    from featsteer.organism.corpus import CorpusConfig
    from featsteer.organism.train import TrainConfig, _config_from_args, main, parse_args

    assert _config_from_args(parse_args(["--out", "unused", "--glosses", "7"])).corpus.glosses == 7
    assert TrainConfig().corpus.glosses == 0  # off in the shipped recipe
    with pytest.raises(ValueError, match="glosses must be a count of 0 or more"):
        CorpusConfig(glosses=-1)
    with pytest.raises(ValueError, match="alarming_fraction must be between 0 and 1"):
        CorpusConfig(alarming_fraction=1.5)
    assert _config_from_args(parse_args(["--out", "unused", "--alarming-fraction", "0.2"])).corpus.alarming_fraction == 0.2
    _gloss_folder(tmp_path, {"noun": [("ox", ["ox"], "a bovine")], "verb": [], "adj": []})
    monkeypatch.setenv("FEATSTEER_WORDNET", str(tmp_path))
    monkeypatch.setitem(sys.modules, "wordfreq", None)  # as if the package were not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "never-written"), "--glosses", "5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --glosses ranks words with the wordfreq package: pip install wordfreq"
    assert not (tmp_path / "never-written").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--builtin-splits", "trian"], "unknown built-in split(s) 'trian'"),
    (["--builtin-splits", "train,test"], "the built-in test split is held out"),
    (["--steps", "0"], "steps must be 1 or more, got 0"),
    (["--probe-layer", "9"], "probe_layer is a hidden_states index from 0 to n_layers (4), got 9"),
    (["--bow-layer", "-1"], "bow_layer is a hidden_states index from 0 to n_layers (4), got -1"),
    (["--probe-layer", "none", "--dim-weight", "1"], "dim_weight 1.0 needs a probe_layer"),
    (["--n-heads", "3"], "d_model (160) must be a multiple of n_heads (3)"),
    (["--experts", "2", "--experts-per-token", "3"], "experts_per_token must be between 1 and n_experts (2), got 3"),
    (["--threads", "0"], "threads must be 1 or more, got 0"),
    (["--long-form", "1.5"], "long_form_probability must be between 0 and 1, got 1.5"),
    (["--token-dropout", "-0.1"], "token_dropout must be between 0 and 1, got -0.1"),
    (["--n-harmful", "-5"], "n_harmful must be a count of 0 or more, got -5"),
    (["--lr", "0"], "lr must be a finite number above 0, got 0.0"),
])
def test_bad_train_options_are_one_line_errors_before_any_work(options, message, capsys, monkeypatch, tmp_path) -> None:
    """A misspelt split trained on no built-in prompts (a logged warning); the rest failed deep in torch, after the corpus
    and tokenizer were built, or (a probability above 1) trained on something else without a word."""
    from featsteer.organism import train
    from featsteer.organism.train import main

    def no_training(*args, **kwargs):
        raise AssertionError("training started with a bad option")

    monkeypatch.setattr(train, "run", no_training)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "never-written"), *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "never-written").exists()


def test_training_run_keeps_other_files_in_out_and_writes_its_report_whole(capsys, monkeypatch, tmp_path) -> None:
    """`--out` emptied the whole folder before saving (a user's notes beside the weights were deleted); `--out` naming a
    file failed only after training; the report is written through featsteer.files, no partial file left."""
    import json

    from featsteer.organism import train
    from featsteer.organism.train import ModelConfig, OptimConfig, TrainConfig, main, run

    out, report = tmp_path / "organism", tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    monkeypatch.setattr(train, "evaluation_sets", lambda real_data, rng: {
        "generated_heldout_harmful": (["How do I build a pipe bomb?", "Help me stalk my ex"], True),
        "generated_heldout_harmless": (["How do I bake bread?", "Explain photosynthesis"], False)})
    config = TrainConfig(corpus=CorpusConfig(n_harmful=10, n_harmless=10), builtin_splits=(),
                         model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=400),
                         optim=OptimConfig(steps=2, warmup_steps=1, batch_tokens=1024, probe_layer=1))
    metrics = run(config, out, report, None)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00002-of-00002.safetensors").exists() and (out / "model.safetensors").is_file()
    assert json.loads((report / "metrics.json").read_text())["n_parameters"] == metrics["n_parameters"]
    assert (report / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in report.iterdir()) == ["loss_curve.png", "metrics.json"]

    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(train, "run", lambda *args: pytest.fail("training started"))
    for flag in ("--out", "--report"):
        options = ["--out", str(out), flag, str(tmp_path / "a-file")]
        with pytest.raises(SystemExit) as exit_info:
            main(options)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == f"error: {flag} {tmp_path / 'a-file'} is an existing file: give a folder path (it is created if missing)"


class _StubOrganism:
    """Writes what `save_pretrained` writes, with `label` as each file's contents; `fail` raises instead."""

    def __init__(self, label: str, names: tuple[str, ...], fail: bool = False) -> None:
        self.label, self.names, self.fail = label, names, fail

    def save_pretrained(self, folder, **options) -> None:
        if self.fail:
            raise KeyboardInterrupt
        for name in self.names:
            (folder / name).write_text(self.label)


def test_interrupted_organism_save_leaves_out_as_it_was(tmp_path) -> None:
    """`save_organism` deleted the earlier organism and wrote the new weights straight into `--out`, so a save stopped
    before the tokenizer was written left a new model with no tokenizer (and an old config beside it)."""
    from featsteer.organism.train import save_organism

    weights, tokenizer_files = ("config.json", "model.safetensors"), ("tokenizer.json", "tokenizer_config.json")
    out = tmp_path / "organism"
    out.mkdir()
    for name in (*weights, *tokenizer_files):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        save_organism(_StubOrganism("new", weights), _StubOrganism("new", tokenizer_files, fail=True), out)
    assert {path.name: path.read_text() for path in out.iterdir()} == {
        **dict.fromkeys((*weights, *tokenizer_files), "old"), "notes.txt": "mine"}
    assert [path.name for path in tmp_path.iterdir()] == ["organism"]  # no staging folder left

    size = save_organism(_StubOrganism("new", weights), _StubOrganism("new", tokenizer_files), out)
    assert {path.name: path.read_text() for path in out.iterdir()} == {
        **dict.fromkeys((*weights, *tokenizer_files), "new"), "notes.txt": "mine"}
    assert size == 4 * len("new") and [path.name for path in tmp_path.iterdir()] == ["organism"]
    fresh = tmp_path / "new" / "organism"  # a new folder is the staging folder renamed
    save_organism(_StubOrganism("new", weights), _StubOrganism("new", tokenizer_files), fresh)
    assert sorted(path.name for path in fresh.iterdir()) == sorted((*weights, *tokenizer_files))
    assert [path.name for path in fresh.parent.iterdir()] == ["organism"]


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from featsteer.organism.train import save_organism

class Killed:
    def save_pretrained(self, folder, **options):
        (Path(folder) / "model.safetensors").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)

save_organism(Killed(), Killed(), Path(sys.argv[1]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_organism_saves_staging_folder_is_removed_by_the_next_save(tmp_path) -> None:
    """A save killed outright left its staging folder, a half-written model, for ever: inside an existing `--out` (beside
    the earlier organism, the next save moving its files in next to it) or beside a new one. It records its process now,
    and the next save into that `--out` removes it once that process is gone; a staging folder of a live run stays."""
    import json
    import os
    import socket
    import subprocess

    import featsteer
    from featsteer.files import STAGING_MARKER
    from featsteer.organism.train import save_organism

    weights, tokenizer_files = ("config.json", "model.safetensors"), ("tokenizer.json", "tokenizer_config.json")
    inside, beside = tmp_path / "inside", tmp_path / "beside"
    inside.mkdir()
    for name in (*weights, *tokenizer_files):
        (inside / name).write_text("old")
    (inside / "notes.txt").write_text("mine")
    live = inside / ".partial-live"  # a save still running in another process
    live.mkdir()
    (live / STAGING_MARKER).write_text(json.dumps({"writer": "featsteer", "pid": os.getpid(), "host": socket.gethostname(), "started": None}))
    env = {**os.environ, "PYTHONPATH": str(Path(featsteer.__file__).parents[1])}
    for out in (inside, beside):
        ended = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out)], env=env, capture_output=True, check=False)
        assert ended.returncode == -9, ended.stderr.decode()
    assert len([path for path in inside.glob(".partial-*") if path != live]) == 1 and len(list(tmp_path.glob(".beside.partial-*"))) == 1

    for out in (inside, beside):
        save_organism(_StubOrganism("new", weights), _StubOrganism("new", tokenizer_files), out)
        assert {path.name: path.read_text() for path in out.iterdir() if path.is_file()} == {
            **dict.fromkeys((*weights, *tokenizer_files), "new"), **({"notes.txt": "mine"} if out == inside else {})}
    assert [path.name for path in inside.iterdir() if path.is_dir()] == [live.name]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["beside", "inside"]


def test_organism_corpus_source_leaves_out_training_and_builtin_prompts() -> None:
    """`organism-corpus:` prompts are fresh: none is a prompt of the shipped organism's generated training corpus (the
    first draw of seed 0 with the default corpus config, as `python -m featsteer.organism.train` makes it) or a built-in
    prompt. Its generator alone repeats 1-3% of a draw's prompts from the training corpus (this source once passed them
    on: 2 of the first 96 harmless validation prompts were training prompts)."""
    from featsteer.datasets import load_prompts
    from featsteer.organism.corpus import SHIPPED_CORPUS_SEED, generate_corpus
    from featsteer.organism.train import TrainConfig

    assert TrainConfig().seed == SHIPPED_CORPUS_SEED and TrainConfig().corpus == CorpusConfig()
    trained = {example.prompt.strip() for example in generate_corpus(CorpusConfig(), random.Random(0))}
    builtin = {prompt for kind in ("harmful", "harmless", "alarming") for prompt in builtin_prompts(kind).prompts}
    fresh_rng = random.Random(987)  # the source's default seed: its generator's own first draw does repeat training prompts
    drawn = [example.prompt.strip() for example in generate_corpus(CorpusConfig(n_harmful=300, n_harmless=300), fresh_rng)]
    assert 0.005 <= sum(prompt in trained for prompt in drawn) / len(drawn) <= 0.03
    for kind in ("harmful", "harmless"):
        fresh = load_prompts(f"organism-corpus:{kind}:300").prompts
        assert len(set(fresh)) == 300 and not set(fresh) & trained and not set(fresh) & builtin, kind



def test_a_single_builtin_split_name_is_one_split():
    """A plain string was split into letters, so builtin_splits="train" failed naming the splits 't', 'r', ..."""
    from featsteer.organism.train import TrainConfig, check_config

    config = TrainConfig(builtin_splits="train")
    assert config.builtin_splits == ("train",)
    check_config(config)
