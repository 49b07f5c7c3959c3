"""featsteer.sae: sae_lens SAEs loaded, validated, encoded and spliced into tiny models."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

import featsteer.sae
from featsteer.activations import capture
from featsteer.errors import FeatsteerError
from featsteer.interventions import steer
from featsteer.sae import (
    FeatureEdit,
    FeatureSteer,
    decode_features,
    edit_features,
    encode_activations,
    load_sae,
    load_sae_source,
    load_saes,
    outside_domain,
    reconstruct,
    reconstruction_stats,
    sae_hook_name,
    splice_activation,
    splice_loss,
    splice_sae,
    validated_sae_map,
)
from featsteer.sae.steering import _PositionTracker
from tests.conftest import count_hooks

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "List three prime numbers."]


pytestmark = pytest.mark.usefixtures("single_thread")


def random_sae(kind: str = "topk", d_in: int = 64, d_sae: int = 128, hook: str | None = HOOK, seed: int = 0) -> SAE:
    """A sae_lens SAE with random weights, built from its config."""
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook, model_name="tiny:llama") if hook else SAEMetadata()
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=metadata))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae.eval()


@pytest.fixture
def sae():
    return random_sae()


def _record(store: dict):
    def hook(activation, site):
        store[site.name] = activation.detach().clone()

    return hook


@pytest.mark.parametrize("kind", ["topk", "standard"])
def test_encoded_features_equal_sae_encode(llama_adapter, kind):
    sae = random_sae(kind)
    acts = capture(llama_adapter, PROMPTS, [HOOK], positions="all", progress=False)
    ours = encode_activations(sae, acts)
    batched = encode_activations(sae, acts, batch_size=7)
    with torch.no_grad():
        reference = sae.encode(acts.hook(HOOK))
    assert ours.shape == (acts.activations.shape[0], 128)
    assert torch.equal(ours, reference)
    torch.testing.assert_close(batched, reference, atol=1e-6, rtol=1e-6)  # BLAS blocking differs by batch size
    assert torch.equal(batched != 0, reference != 0) and bool((ours != 0).any())


def test_splice_without_edits_leaves_logits_unchanged(llama_adapter, sae):
    clean = llama_adapter.logits(PROMPTS)
    with splice_sae(llama_adapter, sae):
        spliced = llama_adapter.logits(PROMPTS)
    with splice_sae(llama_adapter, sae, FeatureEdit.scale(list(range(128)), 1.0)):
        identity_edit = llama_adapter.logits(PROMPTS)
    with splice_sae(llama_adapter, sae, error_term=False):
        replaced = llama_adapter.logits(PROMPTS)
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(identity_edit, clean, atol=1e-5, rtol=0)
    assert not torch.allclose(replaced, clean, atol=1e-3)


def test_splice_removes_its_hook_after_exit_and_after_an_exception(llama_adapter, sae):
    before = count_hooks(llama_adapter.model)
    with splice_sae(llama_adapter, sae, FeatureEdit.ablate(3)):
        assert count_hooks(llama_adapter.model) > before
    assert count_hooks(llama_adapter.model) == before
    with pytest.raises(RuntimeError), splice_sae(llama_adapter, sae, FeatureEdit.clamp(3, 5.0)):
        raise RuntimeError("boom")
    assert count_hooks(llama_adapter.model) == before
    with pytest.raises(RuntimeError), steer(llama_adapter, FeatureSteer(sae, [FeatureEdit.add(1, 2.0)])):
        raise RuntimeError("boom")
    assert count_hooks(llama_adapter.model) == before


def test_edit_features_changes_only_the_chosen_features():
    features = torch.rand(4, 5, 16)
    cases = [(FeatureEdit.clamp([2, 7], 3.5), lambda f: torch.full_like(f, 3.5)), (FeatureEdit.ablate([2, 7]), torch.zeros_like),
             (FeatureEdit.scale([2, 7], -2.0), lambda f: -2.0 * f), (FeatureEdit.add([2, 7], 0.25), lambda f: f + 0.25)]
    for edit, expected in cases:
        edited = edit_features(features, [edit])
        others = [i for i in range(16) if i not in (2, 7)]
        assert torch.equal(edited[..., others], features[..., others])
        torch.testing.assert_close(edited[..., [2, 7]], expected(features[..., [2, 7]]))
    assert torch.equal(features, features.clone())  # input untouched


@pytest.mark.parametrize("mode", ["clamp", "ablate"])
def test_spliced_activation_moves_only_along_the_edited_features(llama_adapter, sae, mode):
    clean, edited = {}, {}
    with llama_adapter.hooks([(HOOK, _record(clean))]):
        llama_adapter.logits(PROMPTS)
    x = clean[HOOK]
    with torch.no_grad():
        features = sae.encode(x)
    ids = (features != 0).sum((0, 1)).argsort(descending=True)[:2].tolist()  # two features that do fire
    edit = FeatureEdit.clamp(ids, 4.0) if mode == "clamp" else FeatureEdit.ablate(ids)
    with splice_sae(llama_adapter, sae, edit), llama_adapter.hooks([(HOOK, _record(edited))]):
        llama_adapter.logits(PROMPTS)
    new_values = torch.full_like(features[..., ids], 4.0) if mode == "clamp" else torch.zeros_like(features[..., ids])
    expected = x + (new_values - features[..., ids]) @ sae.W_dec.detach()[ids]
    torch.testing.assert_close(edited[HOOK], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited[HOOK], x, atol=1e-4)


def test_prompt_and_generated_positions():
    tracker = _PositionTracker()
    assert not tracker.generated_mask(2, 5, torch.device("cpu")).any()  # prompt pass
    assert tracker.generated_mask(2, 1, torch.device("cpu")).all()  # cached generation step
    assert tracker.generated_mask(2, 1, torch.device("cpu")).all()
    assert not tracker.generated_mask(3, 4, torch.device("cpu")).any()  # a new prompt batch
    reread = tracker.generated_mask(3, 5, torch.device("cpu"))  # a backend without cache re-reads the sequence
    assert reread[:, 4].all() and not reread[:, :4].any()


def test_the_models_own_account_of_generation_beats_the_shape_guess(llama_adapter):
    from types import SimpleNamespace

    cpu = torch.device("cpu")
    # a new batch of prompts one token longer than the last pass: the shape guess takes it for a decoding step
    guess, told = _PositionTracker(), _PositionTracker(model=SimpleNamespace(generation_step=None, generation_prompt_length=0))
    for tracker in (guess, told):
        tracker.generated_mask(3, 4, cpu)
    assert guess.generated_mask(3, 5, cpu)[:, 4].all()
    assert not told.generated_mask(3, 5, cpu).any() and told.prompt_length == 5
    # generate() says which pass is which, and stops saying it afterwards
    seen = []
    with llama_adapter.hooks([(HOOK, lambda x, site: seen.append((llama_adapter.generation_step, x.shape[1])))]):
        llama_adapter.generate(PROMPTS[:2], max_new_tokens=3)
    prompt_length = seen[0][1]
    assert seen[0][0] == 0 and prompt_length > 1 and [step for step, _ in seen[1:]] == list(range(1, len(seen)))
    assert llama_adapter.generation_step is None and llama_adapter.generation_prompt_length == prompt_length
    tracker = _PositionTracker(model=llama_adapter)
    assert not tracker.generated_mask(2, 7, cpu).any()  # outside generation every pass is a prompt


def test_positions_select_where_edits_apply(llama_adapter, sae):
    clean = llama_adapter.logits(PROMPTS)
    with splice_sae(llama_adapter, sae, FeatureEdit.clamp(4, 50.0), positions="generated"):
        generated_only = llama_adapter.logits(PROMPTS)
        responses = llama_adapter.generate(PROMPTS[:1], max_new_tokens=3)
    with splice_sae(llama_adapter, sae, FeatureEdit.clamp(4, 50.0), positions="prompt"):
        prompt_only = llama_adapter.logits(PROMPTS)
    torch.testing.assert_close(generated_only, clean, atol=1e-5, rtol=0)
    assert not torch.allclose(prompt_only, clean, atol=1e-3)
    assert isinstance(responses[0], str)
    with pytest.raises(FeatsteerError, match="unknown positions"):
        splice_sae(llama_adapter, sae, positions="middle").__enter__()


def test_feature_steering_leaves_the_head_the_sae_was_not_trained_on(llama_adapter, sae):
    """Tokens before `featsteer_first_position` (the shared chat-template head featsteer-train-sae leaves out) keep their
    activation under an edit and under a replacement, counted within each left-padded prompt, as in the CE metric;
    the tokens after it, and the decoding steps of a KV-cached generation, are edited."""
    first = 3
    sae.cfg.metadata.featsteer_first_position = first
    batch = llama_adapter.tokenize(PROMPTS)
    clean, seen, steps = {}, {}, []
    with llama_adapter.hooks([(HOOK, _record(clean))]):
        llama_adapter.run(batch)
    with steer(llama_adapter, FeatureSteer(sae, [FeatureEdit.clamp(4, 50.0)])), llama_adapter.hooks([(HOOK, _record(seen))]):
        llama_adapter.run(batch)
    moved = (seen[HOOK] - clean[HOOK]).norm(dim=-1) > 1e-4
    own_position = batch.attention_mask.cumsum(1) - 1
    assert not moved[own_position < first].any() and moved[own_position >= first].all()
    with splice_sae(llama_adapter, sae, error_term=False), llama_adapter.hooks([(HOOK, _record(seen))]):
        llama_adapter.run(batch)
    head = (own_position < first) & batch.attention_mask.bool()
    torch.testing.assert_close(seen[HOOK][head], clean[HOOK][head])
    before_edit = []
    with llama_adapter.hooks([(HOOK, lambda x, site: before_edit.append(x.detach().clone()))]), \
            splice_sae(llama_adapter, sae, FeatureEdit.clamp(4, 50.0)), llama_adapter.hooks([(HOOK, lambda x, site: steps.append(x.detach().clone()))]):
        llama_adapter.generate(PROMPTS[:1], max_new_tokens=3)
    assert len(steps) == len(before_edit) > 1 and all(step.shape[1] == 1 for step in steps[1:])  # KV-cached decoding steps
    for before, after in zip(before_edit[1:], steps[1:], strict=True):
        assert (after - before).norm() > 1e-3  # a decoding step's one token is placed after the head, and edited


def test_splice_activation_replacement_is_the_reconstruction(sae):
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = sae.decode(sae.encode(x))
    torch.testing.assert_close(splice_activation(sae, x, error_term=False), expected)
    assert torch.equal(splice_activation(sae, x), x)


def test_width_mismatch_and_missing_hook_are_clear_errors(llama_adapter):
    with pytest.raises(FeatsteerError, match="width mismatch"):
        load_sae(random_sae(d_in=32), llama_adapter)
    with pytest.raises(FeatsteerError, match="has 3 layers"):
        load_sae(random_sae(hook="blocks.9.hook_resid_post"), llama_adapter)
    with pytest.raises(FeatsteerError, match="unknown hook name"):
        load_sae(random_sae(hook="blocks.1.attn.hook_q"), llama_adapter)
    with pytest.raises(FeatsteerError, match="width mismatch at blocks.1.attn.hook_z.*n_heads x d_head = 4 x 16 = 64"):
        load_sae(random_sae(d_in=32, hook="blocks.1.attn.hook_z"), llama_adapter)
    assert sae_hook_name(load_sae(random_sae(hook="blocks.1.attn.hook_z"), llama_adapter)) == "blocks.1.attn.hook_z"  # heads side by side
    with pytest.raises(FeatsteerError, match="no hook_name"):
        load_sae(random_sae(hook=None), llama_adapter)
    with pytest.raises(FeatsteerError, match="out of range"):
        splice_sae(llama_adapter, random_sae(), FeatureEdit.ablate(500)).__enter__()


def test_unknown_edit_mode_is_a_clear_error():
    with pytest.raises(FeatsteerError, match="unknown feature edit"):
        FeatureEdit("boost", (1,), 1.0)
    assert FeatureEdit.from_dict(FeatureEdit.clamp([1, 2], 3.0).to_dict()) == FeatureEdit.clamp([1, 2], 3.0)


def test_directory_round_trip_and_load_saes(tmp_path, llama_adapter):
    first, second = random_sae(seed=1), random_sae(hook="blocks.0.hook_resid_post", seed=2)
    first.save_model(tmp_path / "saes" / HOOK)
    second.save_model(tmp_path / "saes" / "blocks.0.hook_resid_post")
    loaded = load_sae(tmp_path / "saes" / HOOK, llama_adapter)
    assert sae_hook_name(loaded) == HOOK and torch.equal(loaded.W_dec, first.W_dec) and torch.equal(loaded.b_enc, first.b_enc)
    saes = load_saes(tmp_path / "saes", llama_adapter)
    assert list(saes) == ["blocks.0.hook_resid_post", HOOK]
    with pytest.raises(FeatsteerError, match="use load_saes"):
        load_sae(tmp_path / "saes")
    with pytest.raises(FeatsteerError, match="not found"):
        load_sae(tmp_path / "missing")


def test_load_sae_honours_the_device_asked_for(tmp_path, llama_adapter, monkeypatch):
    assert load_sae(random_sae(seed=1), llama_adapter, device="meta").W_dec.device.type == "meta"  # not the model's cpu
    assert load_sae(random_sae(seed=1), llama_adapter).W_dec.device.type == "cpu"
    assert load_sae(random_sae(seed=1), device="meta").W_dec.device.type == "meta"
    random_sae(seed=1).save_model(tmp_path / HOOK)
    monkeypatch.setattr(type(llama_adapter), "device", property(lambda self: torch.device("meta")))  # a model elsewhere
    assert load_sae(tmp_path / HOOK, llama_adapter, device="cpu").W_dec.device.type == "cpu"


def test_release_load_offline_and_unknown_release_are_clear_errors(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FeatsteerError, match="could not download"):
        load_sae("gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical")
    with pytest.raises(FeatsteerError, match="unknown"):
        load_sae("no-such-release:layer_0")


def test_reconstruction_stats_match_direct_computation(sae):
    x = torch.randn(300, 64) * 3 + 1
    stats = reconstruction_stats(sae, x.split(64))
    with torch.no_grad():
        features = sae.encode(x)
        error = (x - sae.decode(features)).double().pow(2).sum()
    total = (x.double() - x.double().mean(0)).pow(2).sum()
    assert stats.n_tokens == 300
    assert stats.explained_variance == pytest.approx(float(1 - error / total), rel=1e-9)
    assert stats.l0 == pytest.approx(float((features != 0).double().sum(-1).mean()))
    assert stats.dead_fraction == pytest.approx(float(((features != 0).sum(0) == 0).double().mean()))


def test_splice_loss_compares_clean_spliced_and_zeroed(llama_adapter, sae):
    from featsteer.evaluation.metrics import response_cross_entropy

    responses = ["Sure, here it is.", "The sea is wide.", "2, 3 and 5."]
    loss = splice_loss(llama_adapter, sae, PROMPTS, responses=responses)
    assert loss.scored == "responses" and loss.n_tokens > 0
    assert loss.clean == pytest.approx(response_cross_entropy(llama_adapter, PROMPTS, responses).mean_nll)
    assert loss.spliced != pytest.approx(loss.clean) and loss.zero_ablated != pytest.approx(loss.clean)
    assert loss.recovered == pytest.approx((loss.zero_ablated - loss.spliced) / (loss.zero_ablated - loss.clean))
    assert splice_loss(llama_adapter, sae, PROMPTS).scored == "text"
    sae.cfg.metadata.featsteer_max_norm = 0.0  # every token outside the SAE's domain: nothing is replaced or zeroed
    untouched = splice_loss(llama_adapter, sae, PROMPTS, responses=responses)
    assert untouched.spliced == pytest.approx(loss.clean) and untouched.zero_ablated == pytest.approx(loss.clean)


def test_splice_loss_leaves_the_prefix_the_sae_was_not_trained_on(llama_adapter, sae):
    """featsteer-train-sae skips the shared chat-template head: CE loss recovered splices and zeroes only the tokens from
    `featsteer_first_position` on, and in text mode scores only the predictions made from them (a hand computation)."""
    first = 3
    sae.cfg.metadata.featsteer_first_position = first
    batch = llama_adapter.tokenize(PROMPTS)
    trained = (batch.attention_mask.cumsum(1) - 1 >= first)[..., None]

    def hand_nll(replace) -> float:
        def hook(activation, site):
            return torch.where(trained, replace(activation), activation)
        with llama_adapter.hooks([(HOOK, hook)]) if replace else contextlib.nullcontext():
            logits = llama_adapter.run(batch)
        nll = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        return float(nll[trained[:, :-1, 0] & batch.attention_mask[:, 1:].bool()].mean())

    loss = splice_loss(llama_adapter, sae, PROMPTS, batch_size=len(PROMPTS))
    assert loss.first_position == first and loss.to_dict()["ce_first_position"] == first
    assert loss.clean == pytest.approx(hand_nll(None), rel=1e-5)
    assert loss.spliced == pytest.approx(hand_nll(lambda x: sae.decode(sae.encode(x))), rel=1e-5)
    assert loss.zero_ablated == pytest.approx(hand_nll(torch.zeros_like), rel=1e-5)
    sae.cfg.metadata.featsteer_first_position = 10_000  # trained on no token here: nothing to replace or score
    with pytest.raises(FeatsteerError, match="not trained on"):
        splice_loss(llama_adapter, sae, PROMPTS)
    responses = ["Sure, here it is.", "The sea is wide.", "2, 3 and 5."]
    untouched = splice_loss(llama_adapter, sae, PROMPTS, responses=responses)
    assert untouched.spliced == pytest.approx(untouched.clean) and untouched.zero_ablated == pytest.approx(untouched.clean)


def test_tokens_above_the_recorded_norm_bound_pass_through_a_splice(sae):
    x = torch.randn(2, 3, 64)
    x[0, 0] *= 100.0  # an attention-sink-like token
    limit = float(x[1].norm(dim=-1).max()) * 2
    sae.cfg.metadata.featsteer_max_norm = limit
    assert outside_domain(sae, x).tolist() == [[True, False, False], [False, False, False]]
    replaced = splice_activation(sae, x, error_term=False)
    edited = splice_activation(sae, x, [FeatureEdit.clamp([0, 1, 2], 5.0)])
    assert torch.equal(replaced[0, 0], x[0, 0]) and torch.equal(edited[0, 0], x[0, 0])
    with torch.no_grad():
        torch.testing.assert_close(replaced[1], sae.decode(sae.encode(x[1])))
    assert not torch.allclose(edited[1], x[1])
    sae.cfg.metadata.featsteer_max_norm = None
    assert outside_domain(sae, x) is None


def test_a_mapping_key_must_be_where_the_sae_attaches(llama_adapter):
    from featsteer.features import score_features
    from featsteer.sae import load_sae_source

    other = "blocks.0.hook_resid_post"
    with pytest.raises(FeatsteerError, match=f"keyed {other} records hook_name {HOOK}"):
        load_sae_source({other: random_sae()}, llama_adapter)  # it would be scored at one hook and steered at another
    acts = capture(llama_adapter, PROMPTS, [other, HOOK], progress=False)
    with pytest.raises(FeatsteerError, match="records hook_name"):
        score_features({other: random_sae()}, acts, acts)
    unnamed = random_sae(hook=None)
    (hook,) = load_sae_source({other: unnamed}, llama_adapter)
    assert hook == other and sae_hook_name(unnamed) == other  # recorded, so steering attaches it there too
    assert FeatureSteer(unnamed, [FeatureEdit.ablate(1)]).hooks_for(llama_adapter)[0][0] == other
    moved = random_sae()
    with pytest.raises(FeatsteerError, match="has 3 layers"):
        load_sae(moved, llama_adapter, hook="blocks.9.hook_resid_post")
    assert sae_hook_name(moved) == HOOK  # a refused move leaves the SAE where it was


def test_feature_edits_take_integer_ids_of_any_kind_and_finite_values():
    import numpy as np

    assert FeatureEdit.clamp(np.int64(5), 1.0).features == (5,)
    assert FeatureEdit.scale(torch.tensor(3), np.float32(0.5)) == FeatureEdit.scale(3, 0.5)
    assert FeatureEdit.ablate(np.array([1, 2])).features == (1, 2)
    for bad in ([3.7], True, "7"):
        with pytest.raises(FeatsteerError, match="is not a feature id"):
            FeatureEdit.clamp(bad, 1.0)
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FeatsteerError, match="finite value"):
            FeatureEdit.add(1, value)


def test_broken_and_unfinished_sae_folders_are_named(tmp_path, llama_adapter):
    random_sae().save_model(tmp_path / "saes" / HOOK)
    weights = tmp_path / "saes" / HOOK / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(FeatsteerError, match="could not load the SAE in .*re-save it"):
        load_sae(tmp_path / "saes" / HOOK, llama_adapter)  # cut-off weights: safetensors' own error type, caught
    random_sae().save_model(tmp_path / "only" / f".{HOOK}.partial-x")  # featsteer-train-sae's staging folder
    with pytest.raises(FeatsteerError, match="holds no SAE folders"):
        load_saes(tmp_path / "only", llama_adapter)
    (tmp_path / "only" / f".{HOOK}.partial-x" / "cfg.json").rename(tmp_path / "nocfg.json")
    (tmp_path / "only" / f".{HOOK}.partial-x").rename(tmp_path / "only" / HOOK)
    with pytest.raises(FeatsteerError, match="weights .* but no cfg.json"):
        load_saes(tmp_path / "only", llama_adapter)


def test_a_release_downloaded_in_its_original_format_is_pointed_to_its_release_id(tmp_path, llama_adapter):
    """A Gemma Scope folder holds `params.npz`, a Llama Scope one `hyperparams.json`; sae_lens converts them only by release."""
    import numpy as np

    np.savez(tmp_path / "params.npz", W_enc=np.zeros((64, 128), dtype=np.float32))
    for load in (lambda: load_sae(tmp_path, llama_adapter), lambda: load_sae_source(str(tmp_path), llama_adapter)):
        with pytest.raises(FeatsteerError, match=r"params.npz: a release in its original format.*pass release:sae_id") as error:
            load()
        assert "\n" not in str(error.value) and "train with featsteer-train-sae" not in str(error.value)


def test_a_lower_precision_sae_leaves_what_it_does_not_edit_exact():
    """A bfloat16 SAE spliced into a float32 stream: the error term and the unedited tokens keep float32 precision."""
    low = random_sae().to(torch.bfloat16)
    x = torch.randn(2, 3, 64)
    assert torch.equal(splice_activation(low, x, [FeatureEdit.scale([0, 1, 2], 1.0)]), x)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    edited = splice_activation(low, x, [FeatureEdit.clamp([0, 1, 2], 5.0)], mask=mask)
    assert torch.equal(edited[~mask], x[~mask]) and not torch.allclose(edited[0, 0], x[0, 0])
    assert splice_activation(low, x, error_term=False).dtype == torch.float32


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_a_lower_precision_sae_moves_the_stream_by_the_edit_and_not_by_b_dec_rounding(kind):
    """A bfloat16 SAE with a large b_dec: a clamp moves the row by (new - old) * decoder row, to bfloat16 accuracy of the
    change itself, not of b_dec + change (which came out up to 30% off)."""
    low = random_sae(kind)
    with torch.no_grad():
        low.b_dec.fill_(4.0)
        low.W_dec.mul_(0.1 / low.W_dec.norm(dim=-1, keepdim=True))
    low = low.to(torch.bfloat16)
    x = torch.randn(4, 6, 64)
    feature = int(low.encode(x.to(torch.bfloat16)).float().sum((0, 1)).argmax())
    edits = [FeatureEdit.clamp([feature], 3.0)]
    with torch.inference_mode():  # as generation runs hooks
        change = splice_activation(low, x, edits) - x
    features = low.encode(x.to(torch.bfloat16)).double()
    expected = (3.0 - features[..., feature:feature + 1]) * low.W_dec[feature].double()
    error = (change.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert error.max() < 0.02, f"largest relative error of the change {error.max():.3f}"


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_reconstruct_decodes_each_batch_of_a_row_normalising_sae(norm):
    """Such an SAE's decode undoes the normalisation its last encode stored: batches must not share it."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, normalize_activations=norm))
    x = torch.randn(5000, 16) * torch.linspace(0.5, 5.0, 5000)[:, None]  # more rows than one default batch
    with torch.no_grad():
        expected = sae.decode(sae.encode(x))
    torch.testing.assert_close(reconstruct(sae, x), expected)
    torch.testing.assert_close(reconstruct(sae, x, batch_size=999), expected)
    with pytest.raises(FeatsteerError, match="reconstruct"):
        decode_features(sae, encode_activations(sae, x))


def test_load_saes_reads_the_hook_a_pre_6_sae_lens_config_records(tmp_path, llama_adapter):
    """sae_lens before 6 kept the hook at the top of cfg.json (`hook_point`); a folder's name is only the fallback."""
    import json

    random_sae(hook=None).save_model(tmp_path / "new" / HOOK)  # records no hook: attached where its folder says
    assert list(load_saes(tmp_path / "new", llama_adapter)) == [HOOK]
    for folder in ("layer_1", "blocks.0.hook_resid_post"):
        random_sae(hook=None).save_model(tmp_path / folder / folder)
        config = tmp_path / folder / folder / "cfg.json"
        saved = json.loads(config.read_text())
        config.write_text(json.dumps({"d_in": saved["d_in"], "d_sae": saved["d_sae"], "hook_point": HOOK, "dtype": "float32",
                                      "device": "cpu", "apply_b_dec_to_input": True, "sae_lens_version": "3.0.0"}))
        saes = load_saes(tmp_path / folder, llama_adapter)
        assert list(saes) == [HOOK] and sae_hook_name(saes[HOOK]) == HOOK


def test_a_transcoder_is_refused_not_spliced_where_it_reads(tmp_path, llama_adapter):
    """A sae_lens Transcoder is an SAE subclass whose decoder writes at another hook (hook_name_out)."""
    from sae_lens import Transcoder, TranscoderConfig

    metadata = SAEMetadata(hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
    Transcoder(TranscoderConfig(d_in=64, d_sae=32, d_out=64, apply_b_dec_to_input=False, metadata=metadata)).save_model(
        tmp_path / "saes" / "blocks.1.ln2.hook_normalized")
    with pytest.raises(FeatsteerError, match="Transcoder: it reads blocks.1.ln2.hook_normalized and writes blocks.1.hook_mlp_out"):
        load_saes(tmp_path / "saes", llama_adapter)


def test_an_sae_whose_input_scaling_was_never_folded_in_is_refused(tmp_path, llama_adapter):
    """A sae_lens training checkpoint records normalize_activations='expected_average_only_in', which only the trainer
    applies: loaded as it is, the SAE would read activations at the wrong scale."""
    torch.manual_seed(0)
    metadata = SAEMetadata(hook_name=HOOK)
    unfolded = TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=8, normalize_activations="expected_average_only_in", metadata=metadata))
    unfolded.save_model(tmp_path / "checkpoint" / HOOK)
    with pytest.raises(FeatsteerError, match="rescaled inputs .*fold_activation_norm_scaling_factor"):
        load_saes(tmp_path / "checkpoint", llama_adapter)
    unfolded.fold_activation_norm_scaling_factor(2.0)
    assert sae_hook_name(load_sae(unfolded, llama_adapter)) == HOOK


def test_two_saes_at_one_hook_in_a_folder_are_an_error_not_one_dropped(tmp_path, llama_adapter):
    """A width sweep at one layer: keyed by hook, one of the two would silently replace the other."""
    random_sae(d_sae=128).save_model(tmp_path / "sweep" / "width_128")
    random_sae(d_sae=64).save_model(tmp_path / "sweep" / "width_64")
    with pytest.raises(FeatsteerError, match=f"width_128 and .*width_64 both hold an SAE at {HOOK}"):
        load_saes(tmp_path / "sweep", llama_adapter)


@pytest.mark.parametrize(("weight", "value"), [("W_dec", float("nan")), ("W_enc", float("inf")), ("b_enc", float("-inf"))])
def test_an_sae_with_non_finite_weights_is_refused_not_loaded(tmp_path, llama_adapter, weight, value):
    broken = random_sae(seed=4)
    with torch.no_grad():
        getattr(broken, weight).view(-1)[5] = value
    broken.save_model(tmp_path / HOOK)
    for call in (lambda: load_sae(tmp_path / HOOK), lambda: load_sae(tmp_path / HOOK, llama_adapter),
                 lambda: load_saes(tmp_path, llama_adapter), lambda: validated_sae_map({HOOK: broken}, llama_adapter),
                 lambda: featsteer.sae.check_finite_weights(broken)):
        with pytest.raises(FeatsteerError, match=f"1 NaN/inf entries in {weight}"):
            call()
    assert "check_finite_weights" in featsteer.sae.__all__  # public: for SAEs built or edited in Python


def test_an_unusable_device_and_a_mismatched_state_dict_are_one_line_errors(tmp_path, llama_adapter, monkeypatch):
    random_sae().save_model(tmp_path / HOOK)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FeatsteerError, match="'cuda' is not available on this machine"):
        load_sae(tmp_path / HOOK, device="cuda")
    with pytest.raises(FeatsteerError, match="unknown device 'gpu0'"):
        load_sae(tmp_path / HOOK, llama_adapter, device="gpu0")
    config = json.loads((tmp_path / HOOK / "cfg.json").read_text())
    (tmp_path / HOOK / "cfg.json").write_text(json.dumps({**config, "d_sae": 16}))  # the weights are 128 wide
    with pytest.raises(FeatsteerError, match="size mismatch for W_dec") as error:
        load_sae(tmp_path / HOOK, llama_adapter)
    assert "\n" not in str(error.value)


def test_an_sae_at_a_routing_hook_is_checked_against_n_experts():
    """The routing hooks are `n_experts` wide: an SAE there was checked against `d_model`, so a `d_model`-wide SAE passed
    validation (and failed later, in the splice) while one as wide as the routing was refused."""
    from featsteer.models import load_model
    from featsteer.testing import tiny_model

    model, tokenizer = tiny_model("qwen3_moe")
    adapter = load_model(model, tokenizer=tokenizer)
    hook = "blocks.0.mlp.hook_router_logits"
    with pytest.raises(FeatsteerError, match=f"width mismatch at {hook}: the SAE reads d_in={adapter.d_model} but .* n_experts={adapter.n_experts} wide"):
        load_sae(random_sae("standard", d_in=adapter.d_model, hook=hook), adapter)
    sae = load_sae(random_sae("standard", d_in=adapter.n_experts, d_sae=16, hook=hook), adapter)
    clean = adapter.logits(PROMPTS)
    with splice_sae(adapter, sae, FeatureEdit.scale([0, 1], 1.0)):
        torch.testing.assert_close(adapter.logits(PROMPTS), clean, atol=1e-5, rtol=0)
