"""Read-side ablation: which readers of the stream (block inputs, the unembedding's) refusal goes through."""

from __future__ import annotations

import pytest
import torch

from featsteer.activations import capture
from featsteer.datasets import builtin_prompts
from featsteer.directions import difference_in_means
from featsteer.directions.readers import direction_readers, reader_groups
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, kl_first_token, refusal_score
from featsteer.models import load_model
from featsteer.testing import random_direction

pytestmark = pytest.mark.usefixtures("single_thread")
HARMFUL = list(builtin_prompts("harmful", "test"))[:6]
HARMLESS = list(builtin_prompts("harmless", "test"))[:6]


def test_rows_name_their_readers_and_the_every_write_row_is_the_unit_of_share():
    model = load_model("tiny:llama")
    result = direction_readers(model, random_direction(model.d_model), HARMFUL, HARMLESS)
    labels = [row.readers for row in result.rows]
    assert labels[:6] == ["every residual write", "every reader", "blocks", "attention", "MLP", "unembedding"]
    assert labels[6:] == [f"blocks.{layer} {part}" for layer in range(model.n_layers) for part in ("attention", "MLP")]
    assert result.row("blocks.1 MLP").hooks == ("blocks.1.ln2.hook_normalized",)
    assert result.row("unembedding").hooks == ("ln_final.hook_normalized",)
    assert "hook_embed" in result.row("every residual write").hooks
    assert result.share(result.row("every residual write")) == pytest.approx(1.0)
    assert all(row.kl_harmless >= -1e-9 for row in result.rows)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    assert result.unedited == pytest.approx(float(refusal_score(first_token_logprobs(model, HARMFUL), tokens).mean()), abs=1e-5)
    short = direction_readers(model, random_direction(model.d_model), HARMFUL[:2], HARMLESS[:2], per_layer=False)
    assert len(short.rows) == 6 and "blocks.0" not in short.markdown()
    assert short.to_dict()["rows"][0]["share"] == pytest.approx(1.0)


def test_unembedding_row_is_the_hand_edited_final_norm():
    """Removing r from what the unembedding sees, done by hand on the final norm's output: y = g * n becomes
    g * (n - (n . r) r)."""
    model = load_model("tiny:llama")
    r = random_direction(model.d_model, 2)
    result = direction_readers(model, r, HARMFUL, HARMLESS, per_layer=False)
    norm = model.model.model.norm

    def edit(module, inputs, output):
        gain = module.weight
        n = output / gain
        return gain * (n - (n @ r)[..., None] * r)

    base = first_token_logprobs(model, HARMLESS)
    handle = norm.register_forward_hook(edit)
    try:
        harmful, harmless = first_token_logprobs(model, HARMFUL), first_token_logprobs(model, HARMLESS)
    finally:
        handle.remove()
    row = result.row("unembedding")
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    assert row.refusal == pytest.approx(float(refusal_score(harmful, tokens).mean()), abs=1e-4)
    assert row.kl_harmless == pytest.approx(kl_first_token(base, harmless), abs=1e-5)
    assert row.kl_harmless > 1e-6  # the edit did something


def test_blocks_that_write_nothing_make_their_readers_irrelevant():
    """With every attention and MLP output projection zeroed, what the blocks read cannot reach the logits: the
    block rows change nothing, while the unembedding row still does."""
    model = load_model("tiny:llama")
    with torch.no_grad():
        for layer in model.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    result = direction_readers(model, random_direction(model.d_model, 3), HARMFUL, HARMLESS)
    for label in ("blocks", "attention", "MLP", "blocks.0 attention", "blocks.1 MLP"):
        assert result.row(label).kl_harmless == pytest.approx(0.0, abs=1e-7)
        assert result.row(label).refusal == pytest.approx(result.unedited, abs=1e-5)
    assert result.row("unembedding").kl_harmless > 1e-6


def test_the_organisms_refusal_is_read_mostly_by_the_unembedding():
    """Measured on the shipped organism (geometry.md of `featsteer directions`): its DIM direction promotes its
    refusal openers through the logit lens, and most of the refusal drop of abliteration comes back when only the
    unembedding stops seeing it; the attention inputs carry almost none of it."""
    model = load_model("organism")
    hook = "blocks.2.hook_resid_pre"
    acts = [capture(model, list(builtin_prompts(kind, "train"))[:48], [hook], positions="last", progress=False)
            for kind in ("harmful", "harmless")]
    r = difference_in_means(*acts, [hook]).direction(hook, -1)
    result = direction_readers(model, r, list(builtin_prompts("harmful", "val"))[:24], list(builtin_prompts("harmless", "val"))[:24],
                               per_layer=False)
    assert result.unedited > 2.0 and result.row("every residual write").refusal < 0.0
    assert result.share(result.row("unembedding")) > 0.5
    assert result.share(result.row("attention")) < 0.2
    assert result.share(result.row("every reader")) > 0.8


def test_a_direction_is_made_unit_and_a_basis_spans_its_rows():
    model = load_model("tiny:llama")
    r = random_direction(model.d_model, 5)
    unit_rows = direction_readers(model, r, HARMFUL[:3], HARMLESS[:3], per_layer=False).rows
    for scaled in (3.0 * r, r[None, :]):  # a longer vector or a one-row basis removes the same thing
        rows = direction_readers(model, scaled, HARMFUL[:3], HARMLESS[:3], per_layer=False).rows
        assert [row.refusal for row in rows] == pytest.approx([row.refusal for row in unit_rows], abs=1e-5)
    second = random_direction(model.d_model, 6)
    basis = torch.stack([r, r + second])  # not orthonormal: the span of r and `second`
    spanned = direction_readers(model, basis, HARMFUL[:3], HARMLESS[:3], per_layer=False)
    orthonormal = torch.linalg.qr(torch.stack([r, second]).double().T).Q.T.float()
    expected = direction_readers(model, orthonormal, HARMFUL[:3], HARMLESS[:3], per_layer=False)
    assert [row.kl_harmless for row in spanned.rows] == pytest.approx([row.kl_harmless for row in expected.rows], abs=1e-6)
    assert spanned.row("every reader").kl_harmless != pytest.approx(direction_readers(model, r, HARMFUL[:3], HARMLESS[:3],
                                                                                       per_layer=False).row("every reader").kl_harmless, abs=1e-9)


def test_estimates_sum_the_readers_and_estimate_only_rows_skip_the_exact_pass():
    from featsteer.directions.attribution import site_attribution

    model = load_model("tiny:llama")
    r = random_direction(model.d_model, 9)
    full = direction_readers(model, r, HARMFUL[:3], HARMLESS[:3], estimate=True)
    per_site = site_attribution(model, HARMFUL[:3], r, full.row("every reader").hooks)
    assert full.row("unembedding").estimate == pytest.approx(per_site["ln_final.hook_normalized"], abs=1e-9)
    assert full.row("MLP").estimate == pytest.approx(sum(full.row(f"blocks.{layer} MLP").estimate for layer in range(model.n_layers)), abs=1e-9)
    assert full.row("every residual write").estimate is None and "estimated share" in full.markdown()
    quick = direction_readers(model, r, HARMFUL[:3], HARMLESS[:3], per_layer="estimate")
    blocks = [row for row in quick.rows if row.readers.startswith("blocks.")]
    assert len(blocks) == 2 * model.n_layers and all(row.refusal is None and row.kl_harmless is None for row in blocks)
    assert [row.estimate for row in blocks] == pytest.approx([full.row(row.readers).estimate for row in blocks], abs=1e-9)
    assert quick.row("blocks").refusal == pytest.approx(full.row("blocks").refusal, abs=1e-6)
    saved = quick.to_dict()["rows"]
    assert saved[-1]["share"] is None and saved[-1]["estimated_share"] is not None
    assert "| blocks.0 attention | - | - |" in quick.markdown()
    with pytest.raises(FeatsteerError, match="per_layer must be"):
        direction_readers(model, r, HARMFUL[:1], HARMLESS[:1], per_layer="sometimes")


def test_bad_input_is_one_clear_line():
    model = load_model("tiny:llama")
    with pytest.raises(FeatsteerError, match="d_model=64"):
        direction_readers(model, torch.ones(7), HARMFUL, HARMLESS)
    with pytest.raises(FeatsteerError, match="zero direction"):
        direction_readers(model, torch.zeros(model.d_model), HARMFUL, HARMLESS)
    with pytest.raises(FeatsteerError, match="linearly dependent"):
        direction_readers(model, torch.stack([random_direction(model.d_model), 2 * random_direction(model.d_model)]), HARMFUL, HARMLESS)
    with pytest.raises(FeatsteerError, match="needs harmful and harmless"):
        direction_readers(model, random_direction(model.d_model), [], HARMLESS)
    with pytest.raises(FeatsteerError, match="no reader row"):
        direction_readers(model, random_direction(model.d_model), HARMFUL[:1], HARMLESS[:1], per_layer=False).row("blocks.0 MLP")


def test_the_same_readers_on_both_backends(tmp_path):
    """GPT-2 (LayerNorm) through transformers and through TransformerLens: the same hook names reach the same readers,
    so every row agrees."""
    from featsteer.testing import hooked_gpt2, saved_tokenizer, tiny_model

    hf, tokenizer = tiny_model("gpt2")
    rows = []
    for model in (load_model(hf, tokenizer=tokenizer), load_model(hooked_gpt2(hf, saved_tokenizer(tokenizer, tmp_path)))):
        result = direction_readers(model, random_direction(model.d_model, 4), HARMFUL[:3], HARMLESS[:3], per_layer=False)
        rows.append([(row.readers, row.refusal, row.kl_harmless) for row in result.rows])
    for (label, refusal, kl), (label_tl, refusal_tl, kl_tl) in zip(*rows, strict=True):
        assert label == label_tl and refusal == pytest.approx(refusal_tl, abs=1e-3) and kl == pytest.approx(kl_tl, abs=1e-4)
    assert max(kl for _, _, kl in rows[0]) > 1e-6  # the removals changed the outputs


def test_reader_groups_need_input_norms():
    with pytest.raises(FeatsteerError, match="olmo2 has no norms before its attention and MLP"):
        reader_groups(load_model("tiny:olmo2"))
    assert reader_groups(load_model("tiny:cohere"), per_layer=False)["attention"] == load_model("tiny:cohere").hook_names(("ln1_normalized",))
