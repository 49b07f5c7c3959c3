"""Dtype and device options: names and errors, and half-precision models through hooks, edits, SAEs and export."""

from __future__ import annotations

import json

import pytest
import torch

from featsteer.activations import capture
from featsteer.cli import main
from featsteer.datasets import builtin_prompts
from featsteer.directions import difference_in_means
from featsteer.edits import apply_edit
from featsteer.errors import FeatsteerError
from featsteer.interventions import Ablate, steer
from featsteer.models import load_model
from featsteer.models.loading import resolve_device, resolve_dtype
from featsteer.testing import tiny_model

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("BFloat16", torch.bfloat16), ("torch.float16", torch.float16), ("half", torch.float16),
                                             (torch.bfloat16, torch.bfloat16), ("auto", "auto")])
def test_dtype_names(name, dtype):
    assert resolve_dtype(name) == dtype


@pytest.mark.parametrize(("value", "message"), [("int8", "unknown dtype 'int8'"), ("fp8", "unknown dtype"),
                                                (torch.int64, "not a floating-point dtype")])
def test_bad_dtypes_are_clear_errors(value, message):
    with pytest.raises(FeatsteerError, match=message):
        resolve_dtype(value)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FeatsteerError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(FeatsteerError, match="unsupported device 'meta'"):
        resolve_device("meta")
    if NO_CUDA:
        with pytest.raises(FeatsteerError, match="'cuda:1' is not available: this torch build sees no CUDA GPU"):
            resolve_device("cuda:1")


def test_load_model_in_each_dtype_and_auto_reads_the_checkpoint(tmp_path):
    assert load_model("tiny:llama", dtype="bf16").dtype == torch.bfloat16
    model, tokenizer = tiny_model("qwen2")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert load_model(str(tmp_path / "m"), dtype="auto").dtype == torch.bfloat16
    assert load_model(str(tmp_path / "m")).dtype == torch.float32  # the default stays float32
    assert load_model(str(tmp_path / "m"), dtype="float16").dtype == torch.float16
    with pytest.raises(FeatsteerError, match="unknown dtype 'int4'"):
        load_model(str(tmp_path / "m"), dtype="int4")


@pytest.fixture(scope="module")
def organism_pair():
    """The organism in float32 and in bfloat16 with the DIM direction each finds for itself."""
    out = {}
    harmful, harmless = builtin_prompts("harmful", "train").head(48), builtin_prompts("harmless", "train").head(48)
    for dtype in ("float32", "bfloat16"):
        model = load_model("organism", dtype=dtype)
        hooks = model.hook_names(("resid_pre",))
        acts = [capture(model, prompts, hooks, positions="last", progress=False) for prompts in (harmful, harmless)]
        out[dtype] = (model, acts, difference_in_means(*acts).direction("blocks.2.hook_resid_pre"))
    return out


def test_half_precision_statistics_are_float32_and_match(organism_pair):
    (_, _, r32), (_, acts16, r16) = organism_pair["float32"], organism_pair["bfloat16"]
    assert acts16[0].activations.dtype == torch.float32 and r16.dtype == torch.float32
    assert torch.isfinite(acts16[0].activations).all()
    assert float(torch.nn.functional.cosine_similarity(r16.double(), r32.double(), dim=0)) > 0.999


def test_half_precision_hook_and_weight_edit_agree_to_the_dtypes_own_precision(organism_pair):
    """In bfloat16 the hook and the edited weights cannot agree to 1e-4 as in float32, but they must agree as well as
    the bfloat16 model agrees with the float32 one; the edit reverts bit for bit and the model stays bfloat16."""
    model32, model16 = organism_pair["float32"][0], organism_pair["bfloat16"][0]
    r = organism_pair["float32"][2]
    prompts = builtin_prompts("harmless", "test").to_list()[:12]
    rounding = float((model16.logits(prompts) - model32.logits(prompts)).abs().max())
    before = {name: tensor.clone() for name, tensor in model16.model.state_dict().items()}
    seen = []
    with steer(model16, Ablate(r)), model16.hooks([("blocks.3.hook_resid_post", lambda x, s: seen.append(x.dtype))]):
        hooked = model16.logits(prompts)
    with apply_edit(model16, r):
        edited = model16.logits(prompts)
        assert all(t.dtype == torch.bfloat16 for t in model16.model.state_dict().values() if t.is_floating_point())
    assert seen and set(seen) == {torch.bfloat16}
    assert 0 < float((hooked - edited).abs().max()) <= 2 * rounding
    with steer(model32, Ablate(r)):
        hooked32 = model32.logits(prompts)
    assert float((hooked - hooked32).abs().max()) <= 2 * rounding
    assert all(torch.equal(before[name], tensor) for name, tensor in model16.model.state_dict().items())


def test_half_precision_sae_splice_keeps_the_model_dtype(organism_pair):
    from featsteer.sae import FeatureEdit, FeatureSteer, load_saes

    model = organism_pair["bfloat16"][0]
    sae = load_saes("organism", model)["blocks.3.hook_resid_pre"]
    prompts = builtin_prompts("harmful", "test").to_list()[:4]
    seen = []
    with steer(model, FeatureSteer(sae, [FeatureEdit.scale(888, 1.0)])), \
            model.hooks([("blocks.3.hook_resid_post", lambda x, s: seen.append(x.dtype))]):
        spliced = model.logits(prompts)
    assert seen and set(seen) == {torch.bfloat16}
    # scale 1 leaves the feature as it is: the splice (reconstruction + error term) gives the unspliced logits back
    assert float((spliced - model.logits(prompts)).abs().max()) < 0.1


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_dtype_and_device_options(capsys, tmp_path):
    code, out, _ = _cli(capsys, "info", "--model", "organism", "--dtype", "bf16")
    assert code == 0 and "dtype     torch.bfloat16" in out and "device    cpu" in out
    code, _, err = _cli(capsys, "eval", "--model", "organism", "--harmful", "builtin:harmful:test", "--harmless",
                        "builtin:harmless:test", "--dtype", "int8")
    assert code == 2 and err.strip() == "featsteer: error: unknown dtype 'int8': use auto, float32, bfloat16 or float16"
    if NO_CUDA:
        code, _, err = _cli(capsys, "steer", "--mode", "ablate", "--directions", str(tmp_path), "--prompt", "hi", "--device", "cuda")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err


def test_cli_abliterates_a_bfloat16_model_and_exports_it_in_bfloat16(capsys, tmp_path):
    out = tmp_path / "edited"
    code, stdout, _ = _cli(capsys, "abliterate", "--model", "organism", "--dtype", "bfloat16", "--harmful", "builtin:harmful:train",
                           "--harmless", "builtin:harmless:train", "--n", "48", "--n-select", "8", "--eval-n", "8",
                           "--max-new-tokens", "8", "--out", str(out))
    assert code == 0 and "wrote" in stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_model(str(out), dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    harmful = builtin_prompts("harmful", "test").to_list()[:8]
    plain = load_model("organism", dtype="bfloat16")
    from featsteer.evaluation import RefusalDetector

    detector = RefusalDetector()
    assert sum(map(detector.is_refusal, plain.generate(harmful, max_new_tokens=8))) >= 6
    assert sum(map(detector.is_refusal, reloaded.generate(harmful, max_new_tokens=8))) <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interventions_compute_in_float32_and_keep_the_stream_dtype(dtype):
    """Ablation, addition, projection-set, rotation and LEACE on a half-precision stream give the float32 result rounded
    once to the stream's dtype (computed in bfloat16, with the direction and the projection rounded, ablation left 2.6 times
    as much of the direction behind on the bfloat16 organism)."""
    from featsteer.interventions import LeaceEraser
    from featsteer.interventions.operations import ablate, add, project_set, rotate_in_plane

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 64, generator=generator) * 4
    x[..., 7] = 300.0  # a massive activation, as real residual streams have
    r = torch.randn(64, generator=generator, dtype=torch.float64)
    r[7] = 2.0
    r = r / r.norm()
    second = torch.randn(64, generator=generator, dtype=torch.float64)
    second = second - (second @ r) * r
    plane = torch.stack([r, second / second.norm()])
    eraser = LeaceEraser(x.mean((0, 1)), 3 * r.float(), r.float() / 3)
    operations = {"ablate": lambda t: ablate(t, r), "reflect": lambda t: ablate(t, r, 2.0), "add": lambda t: add(t, r, -6.5),
                  "set": lambda t: project_set(t, r, 11.3), "rotate": lambda t: rotate_in_plane(t, plane, 135.0, True),
                  "erase": eraser}
    stream = x.to(dtype)
    for name, operation in operations.items():
        out = operation(stream)
        assert out.dtype == dtype, name
        torch.testing.assert_close(out, operation(stream.float()).to(dtype), atol=0, rtol=0, msg=name)
