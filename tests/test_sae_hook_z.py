"""Attention-output SAEs on `blocks.{l}.attn.hook_z`: captured, validated, encoded, spliced, mapped into the stream."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from featsteer.activations import capture, hook_width
from featsteer.errors import FeatsteerError
from featsteer.features import (
    MAPPED_THROUGH,
    decoder_directions,
    output_projection,
    score_prompts,
    top_feature_directions,
)
from featsteer.interventions import Ablate, AddDirection, steer
from featsteer.models import load_model
from featsteer.sae import (
    FeatureEdit,
    FeatureSteer,
    encode_activations,
    load_sae,
    splice_activation,
    splice_sae,
)
from featsteer.testing import byte_tokenizer, hooked_gpt2, saved_tokenizer, tiny_model
from tests.conftest import count_hooks

LAYER = 1
HOOK_Z = f"blocks.{LAYER}.attn.hook_z"
ATTN_OUT = f"blocks.{LAYER}.hook_attn_out"
PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "List three prime numbers."]

pytestmark = pytest.mark.usefixtures("single_thread")


def narrow_heads_model():
    """A tiny Qwen3 whose heads side by side (4 x 8 = 32) are narrower than its stream (64), as in Gemma 2."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = byte_tokenizer()
    config = Qwen3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    return load_model(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), tokenizer=tokenizer)


def heads_sae(d_in: int, *, kind: str = "topk", reshape: str = "hook_z", hook: str = HOOK_Z, d_sae: int = 96, seed: int = 0) -> SAE:
    """A random sae_lens SAE on hook_z (`reshape_activations="hook_z"` as sae_lens' own hook_z releases)."""
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook, model_name="tiny")
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6, reshape_activations=reshape, metadata=metadata))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, reshape_activations=reshape, metadata=metadata))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae.eval()


def _model(family: str, tmp_path):
    if family == "narrow":
        return narrow_heads_model()
    if family == "tl:gpt2":
        model, tokenizer = tiny_model("gpt2")
        return load_model(hooked_gpt2(model, saved_tokenizer(tokenizer, tmp_path)))
    return load_model(f"tiny:{family}")


def _recorded(model, hooks: list[str], prompts=PROMPTS, extra=()) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def record(activation, site):
        seen[site.name] = activation.detach().clone()

    with model.hooks([*extra, *[(hook, record) for hook in hooks]]):
        model.run(model.tokenize(prompts))
    return seen


def test_capture_stores_the_heads_side_by_side():
    model = narrow_heads_model()
    assert hook_width(model, HOOK_Z) == 32 and hook_width(model, ATTN_OUT) == 64
    acts = capture(model, PROMPTS, [HOOK_Z], positions="all", progress=False)
    heads = _recorded(model, [HOOK_Z])[HOOK_Z]  # (batch, pos, 4, 8)
    real = model.tokenize(PROMPTS).attention_mask.bool()
    assert heads.shape[-2:] == (4, 8) and acts.d_model == 32
    torch.testing.assert_close(acts.hook(HOOK_Z), heads[real].flatten(-2).to(acts.activations.dtype))  # rows in prompt order
    last = capture(model, PROMPTS, [HOOK_Z, f"blocks.{LAYER + 1}.attn.hook_z"], progress=False)
    torch.testing.assert_close(last.hook(HOOK_Z), heads[:, -1].flatten(-2))
    with pytest.raises(FeatsteerError, match="rows are 32 wide but blocks.1.hook_attn_out rows are 64.*separate calls"):
        capture(model, PROMPTS, [HOOK_Z, ATTN_OUT], progress=False)


def test_hook_z_sae_is_validated_against_the_heads_width():
    model = narrow_heads_model()
    assert load_sae(heads_sae(32), model).cfg.d_in == 32
    with pytest.raises(FeatsteerError) as error:
        load_sae(heads_sae(64), model)
    message = str(error.value)
    assert "width mismatch at blocks.1.attn.hook_z" in message and "d_in=64" in message and "4 x 8 = 32" in message
    assert "--hook attn_z" in message and len(message.splitlines()) == 1
    with pytest.raises(FeatsteerError, match="reshape_activations='hook_z'.*attach it at blocks.1.attn.hook_z"):
        load_sae(heads_sae(64), model, hook="blocks.1.hook_resid_post")
    with pytest.raises(FeatsteerError, match="width mismatch.*d_model=64"):
        load_sae(heads_sae(32, reshape="none", hook="blocks.1.hook_resid_post"), model)


@pytest.mark.parametrize("kind", ["topk", "standard"])
def test_features_of_flat_rows_equal_sae_lens_encode_of_the_heads(kind):
    model = narrow_heads_model()
    sae = heads_sae(32, kind=kind)
    acts = capture(model, PROMPTS, [HOOK_Z], positions="all", progress=False)
    heads = acts.hook(HOOK_Z).unflatten(-1, (4, 8))
    with torch.no_grad():
        reference = sae.encode(heads)  # sae_lens flattens the heads itself
        reference_out = sae.decode(reference)
    ours = encode_activations(sae, acts)
    assert torch.equal(ours, reference) and bool((ours != 0).any())
    assert torch.equal(encode_activations(sae, heads), reference)  # head-shaped input is flattened first
    assert sae.hook_z_reshaping_mode and sae.d_head == 8  # sae_lens' own state is back as it was
    with torch.no_grad():
        assert torch.equal(sae.decode(reference), reference_out) and reference_out.shape[-2:] == (4, 8)
    with pytest.raises(FeatsteerError, match="width 64 but the SAE reads d_in=32"):
        encode_activations(sae, torch.randn(5, 64))


def test_a_hook_z_sae_that_reads_flat_rows_behaves_the_same():
    """Gemma Scope 3's attention SAEs sit at hook_z with `reshape_activations="none"` (flat rows in): same weights, same
    features and the same steered model as an SAE that reshapes the heads itself."""
    model = narrow_heads_model()
    reshaping, flat = heads_sae(32), heads_sae(32, reshape="none")
    flat.load_state_dict(reshaping.state_dict())
    acts = capture(model, PROMPTS, [HOOK_Z], positions="all", progress=False)
    assert torch.equal(encode_activations(flat, acts), encode_activations(reshaping, acts))
    logits = []
    for sae in (reshaping, flat):
        with splice_sae(model, load_sae(sae, model), FeatureEdit.clamp([0, 5], 2.0)):
            logits.append(model.logits(PROMPTS))
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], model.logits(PROMPTS), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "narrow"])
def test_splice_at_hook_z_without_edits_leaves_the_logits_unchanged(family, tmp_path):
    model = _model(family, tmp_path)
    sae = heads_sae(hook_width(model, HOOK_Z))
    clean = model.logits(PROMPTS)
    with splice_sae(model, sae):
        spliced = model.logits(PROMPTS)
    with splice_sae(model, sae, FeatureEdit.scale(list(range(96)), 1.0)):  # runs encode/decode, changes nothing
        identity = model.logits(PROMPTS)
    with splice_sae(model, sae, error_term=False):
        replaced = model.logits(PROMPTS)
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(identity, clean, atol=1e-5, rtol=0)
    assert not torch.allclose(replaced, clean, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "narrow", "tl:gpt2"])
def test_clamping_a_feature_at_hook_z_moves_attn_out_by_its_decoder_row_through_w_o(family, tmp_path):
    model = _model(family, tmp_path)
    sae = heads_sae(hook_width(model, HOOK_Z))
    clean = _recorded(model, [HOOK_Z, ATTN_OUT])
    z = clean[HOOK_Z].flatten(-2)
    feature = int(encode_activations(sae, z).ne(0).sum((0, 1)).argmax())  # a feature that fires somewhere
    before = encode_activations(sae, z)[..., feature]
    with splice_sae(model, sae, FeatureEdit.clamp(feature, 3.0)):
        edited = _recorded(model, [HOOK_Z, ATTN_OUT])
    row = sae.W_dec.detach()[feature]
    z_change = (3.0 - before)[..., None] * row  # what the splice adds to each token's heads
    torch.testing.assert_close(edited[HOOK_Z].flatten(-2) - z, z_change, atol=1e-5, rtol=1e-5)
    attn_change = (z_change.double() @ output_projection(model, LAYER).T).float()
    torch.testing.assert_close(edited[ATTN_OUT] - clean[ATTN_OUT], attn_change, atol=1e-4, rtol=1e-4)
    assert float(attn_change.abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "narrow", "tl:gpt2"])
def test_mapped_direction_is_the_attn_out_change_of_adding_the_row_at_hook_z(family, tmp_path):
    model = _model(family, tmp_path)
    sae = heads_sae(hook_width(model, HOOK_Z), seed=3)
    torch.manual_seed(7)
    feature = int(torch.randint(0, 96, ()))
    row = sae.W_dec.detach()[feature]

    def add_row(z, site):
        return z + row.view(z.shape[-2:]).to(z.dtype)

    clean = _recorded(model, [ATTN_OUT])[ATTN_OUT]
    pushed = _recorded(model, [ATTN_OUT], extra=[(HOOK_Z, add_row)])[ATTN_OUT]
    change = (pushed - clean)[0, -1].double()
    directions = decoder_directions(sae, feature, model=model)
    assert directions.hook_names == (ATTN_OUT,) and directions.method == f"sae:{HOOK_Z}" and directions.bases.shape == (1, 1, model.d_model)
    assert directions.provenance["mapped_through"] == MAPPED_THROUGH and directions.provenance["layer"] == LAYER
    assert directions.provenance["sae_hook"] == HOOK_Z
    torch.testing.assert_close(directions.bases[0, 0].double(), change / change.norm(), atol=1e-4, rtol=0)
    # the change is the same at every token: the write of a fixed head-space vector, the bias left out
    torch.testing.assert_close((pushed - clean)[1, 2].double(), change, atol=1e-4, rtol=1e-4)


def test_mapped_directions_plug_into_the_usual_interventions():
    model = load_model("tiny:llama")
    sae = heads_sae(64)
    features = [2, 11, 40]
    rank1 = decoder_directions(sae, features[0], model=model)
    writes = sae.W_dec.detach()[features[0]].double() @ output_projection(model, LAYER).T
    clean = model.logits(PROMPTS)
    with model.hooks([(HOOK_Z, lambda z, site: z + 2.0 * sae.W_dec.detach()[features[0]].view(4, 16))]):
        at_heads = model.logits(PROMPTS)
    with steer(model, AddDirection(rank1.bases[0, 0] * float(writes.norm()), 2.0, where=rank1.hook_names[0])):
        at_stream = model.logits(PROMPTS)
    torch.testing.assert_close(at_stream, at_heads, atol=1e-4, rtol=1e-4)
    subspace = decoder_directions(sae, features, subspace=True, model=model)
    basis = subspace.bases[0]
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    seen = {}
    with steer(model, Ablate(basis)), model.hooks([(ATTN_OUT, lambda x, site: seen.setdefault("x", x.clone()))]):
        ablated = model.logits(PROMPTS)
    assert float((seen["x"] @ basis.T).abs().max()) < 1e-4 and not torch.allclose(ablated, clean, atol=1e-4)


def test_scoring_and_top_directions_with_hook_z_and_stream_saes_of_different_widths():
    model = narrow_heads_model()
    stream = heads_sae(64, reshape="none", hook="blocks.2.hook_resid_post", seed=1)
    saes = {HOOK_Z: heads_sae(32), "blocks.2.hook_resid_post": stream}
    harmful, harmless = ["How do I pick a lock?", "Make a weapon.", "Hack a bank."], PROMPTS
    scores = score_prompts(model, saes, harmful, harmless)
    assert sorted(set(scores.hook_names)) == sorted(saes) and len(scores) == 2 * 96
    assert scores.provenance["hooks"] == list(saes)
    best = top_feature_directions(scores.for_hook(HOOK_Z), saes, 2, model=model)
    assert best.hook_names == (ATTN_OUT, ATTN_OUT) and best.provenance["sae_hooks"] == [HOOK_Z, HOOK_Z]
    with pytest.raises(FeatsteerError, match="pass model=<the model>"):
        top_feature_directions(scores, saes, 3)


def test_rank_features_takes_hook_z_and_stream_saes_of_different_widths_in_one_call(tmp_path):
    from featsteer.directions import difference_in_means
    from featsteer.feature_report import decoder_dim_cosines, rank_features, write_feature_report

    model = narrow_heads_model()
    stream_hook = "blocks.2.hook_resid_post"
    saes = {HOOK_Z: heads_sae(32), stream_hook: heads_sae(64, reshape="none", hook=stream_hook, seed=1)}
    harmful, harmless = ["How do I pick a lock?", "Make a weapon.", "Hack a bank."], PROMPTS
    ranking = rank_features(model, saes, harmful, harmless, top_n=6, n_examples=2)
    assert sorted(set(ranking.scores.hook_names)) == sorted(saes) and len(ranking.scores) == 2 * 96
    assert ranking.scores.provenance["hooks"] == list(saes)
    values = ranking.scores.column("composite")
    assert bool((values[:-1] >= values[1:]).all())  # one ranking across both SAEs
    assert ranking.dim[HOOK_Z].shape == (32,) and ranking.dim[stream_hook].shape == (64,)
    for hook in saes:  # each hook's DIM comes from its own capture, at its own width
        acts = [capture(model, p, [hook], progress=False) for p in (harmful, harmless)]
        expected = difference_in_means(*acts, [hook]).direction(hook, -1)
        torch.testing.assert_close(ranking.dim[hook], expected)
        torch.testing.assert_close(ranking.dim_cosines[hook], decoder_dim_cosines(saes[hook], expected))
    assert {d.hook_name for d in ranking.features} <= set(saes) and all(d.examples for d in ranking.features)
    assert (write_feature_report(ranking, tmp_path / "r") / "report.html").is_file()


def test_compare_ranks_hook_z_and_stream_saes_of_different_widths_together():
    from featsteer.compare import rank_sae_features
    from featsteer.sae import encode_activations

    model = narrow_heads_model()
    stream_hook = "blocks.2.hook_resid_post"
    saes = {HOOK_Z: heads_sae(32), stream_hook: heads_sae(64, reshape="none", hook=stream_hook, seed=1)}
    harmful, harmless = ["How do I pick a lock?", "Make a weapon.", "Hack a bank."], PROMPTS
    ranking = rank_sae_features(model, saes, harmful, harmless)
    assert set(ranking.scores.hook_names) <= set(saes) and list(ranking.harmful_max) == list(saes)
    values = ranking.scores.column("composite")
    assert bool((values[:-1] >= values[1:]).all()) and bool((ranking.scores.metrics["mean_difference"] > 0).all())
    for hook, sae in saes.items():  # each maximum read at the hook's own width
        acts = capture(model, harmful, [hook], progress=False)
        torch.testing.assert_close(ranking.harmful_max[hook], encode_activations(sae, acts, hook=hook).double().amax(0).clamp_min(0.0))


def test_bad_input_is_one_clear_line():
    gemma = load_model("tiny:gemma2")
    sae = heads_sae(hook_width(gemma, HOOK_Z))
    cases = [
        (lambda: decoder_directions(sae, 0, model=gemma), "normalises the attention output"),
        (lambda: decoder_directions(sae, 0), "pass model=<the model>"),
        (lambda: decoder_directions(heads_sae(32), 0, model=load_model("tiny:llama")), "width mismatch"),
        (lambda: decoder_directions(sae, 500, model=load_model("tiny:llama")), "out of range"),
        (lambda: splice_activation(sae, torch.randn(1, 2, 4, 8)), "shape \\(1, 2, 4, 8\\) but the SAE reads d_in=64"),
    ]
    for call, message in cases:
        with pytest.raises(FeatsteerError, match=message) as error:
            call()
        assert len(str(error.value).splitlines()) == 1
    # splicing needs no linear write, so a Gemma 2 attention SAE still steers (and cleans up after itself)
    before, clean = count_hooks(gemma.model), gemma.logits(PROMPTS)
    with steer(gemma, FeatureSteer(sae, [FeatureEdit.clamp(1, 4.0)])):
        steered = gemma.logits(PROMPTS)
    assert count_hooks(gemma.model) == before and not torch.allclose(steered, clean, atol=1e-4)


def test_organism_end_to_end_train_rank_and_clamp_an_attention_feature(tmp_path):
    """Train a small hook_z SAE on the organism, rank its features on harmful vs harmless prompts, clamp the top one."""
    from featsteer.datasets import builtin_prompts
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
    from featsteer.feature_report import rank_features
    from featsteer.sae import load_saes
    from sae_training.cli import main

    hook = "blocks.2.attn.hook_z"
    assert main(["--model", "organism", "--layers", "2", "--hook", "attn_z", "--d-sae", "320", "--k", "8", "--tokens", "6000",
                 "--lr", "3e-3", "--text", "organism-corpus:200", "--batch-tokens", "128", "--eval-prompts", "8", "--quiet",
                 "--out", str(tmp_path)]) == 0
    model = load_model("organism")
    saes = load_saes(tmp_path, model)
    assert list(saes) == [hook] and saes[hook].cfg.d_in == model.n_heads * 32 == 160
    harmful, harmless = builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16)
    ranking = rank_features(model, saes, harmful, harmless, top_n=3, n_examples=1)
    top = ranking.features[0]
    assert top.hook_name == hook and top.scores["mean_difference"] > 0 and top.scores["auroc"] > 0.6
    assert len(top.promoted) == 10 and len(ranking.scores) == 320  # decoder rows read through W_O and the unembedding

    prompts = harmless.to_list()[:8]
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    before = refusal_score(first_token_logprobs(model, prompts), tokens)
    clamp = FeatureEdit.clamp(top.feature_id, 20 * float(top.harmful_activations.max()))
    with steer(model, FeatureSteer(saes[hook], [clamp])):
        after = refusal_score(first_token_logprobs(model, prompts), tokens)
        responses = model.generate(prompts[:2], max_new_tokens=4)
    assert float(after.mean()) > float(before.mean()) + 0.5  # a harmful-side attention feature pushes towards refusal
    assert all(isinstance(response, str) for response in responses)
    direction = decoder_directions(saes[hook], top.feature_id, model=model)
    with steer(model, Ablate(direction.bases[0])):
        ablated = model.logits(prompts)
    assert direction.hook_names == ("blocks.2.hook_attn_out",) and not torch.allclose(ablated, model.logits(prompts), atol=1e-4)


def test_compare_runs_the_sae_methods_on_an_attention_sae():
    """`compare --sae` with a hook_z SAE: ranking on the heads, abliteration of the mapped row, clamping at hook_z; the
    runtime ablation of the mapped direction and its weight edit are the same model."""
    from featsteer.compare import SaeMethodConfig, compare
    from featsteer.datasets import builtin_prompts
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.pipeline import DirectionConfig

    model = narrow_heads_model()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    sae = heads_sae(hook_width(model, HOOK_Z))
    harmful, harmless = builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16)
    comparison = compare(model, harmful, harmless, methods=["sae_top1_abliteration", "sae_top1_ablation_hook", "sae_clamp_hook"],
                         saes={HOOK_Z: sae}, sae_config=SaeMethodConfig(top_k=2, clamp_multiple=0.0),
                         direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=3))
    by_name = {r.method: r for r in comparison.results}
    assert all(r.details["sae_hook"] == HOOK_Z for r in comparison.results)
    assert by_name["sae_top1_ablation_hook"].kl_harmless == pytest.approx(by_name["sae_top1_abliteration"].kl_harmless, abs=1e-4)
    assert by_name["sae_clamp_hook"].details["sae_features"] and comparison.setup["sae"]["hooks"] == {HOOK_Z: 96}
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
