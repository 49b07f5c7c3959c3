"""Activation capture: positions, ordering, float64 statistics, NaN errors, early stop, streaming."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from featsteer.activations import ActivationReader, ActivationSet, Positions, capture
from featsteer.errors import FeatsteerError

PROMPTS = [f"instruction {i} " + "word " * (i % 5) for i in range(23)]


def test_last_token_capture_matches_single_prompt_runs(llama_adapter):
    hooks = llama_adapter.hook_names(("resid_pre", "resid_post"))
    acts = capture(llama_adapter, PROMPTS, hooks, batch_size=4, progress=False)
    assert acts.activations.shape == (len(PROMPTS), len(hooks), llama_adapter.d_model)
    assert acts.prompt_index.tolist() == list(range(len(PROMPTS)))
    for i in (0, 7, 22):
        single = capture(llama_adapter, [PROMPTS[i]], hooks, progress=False)
        torch.testing.assert_close(single.activations[0], acts.activations[i], atol=1e-5, rtol=0)
    seen = {}

    def record(x, site):
        seen["x"] = x[:, -1].clone()

    with llama_adapter.hooks([("blocks.2.hook_resid_pre", record)]):
        llama_adapter.run(llama_adapter.tokenize(PROMPTS[:1]))
    torch.testing.assert_close(acts.hook("blocks.2.hook_resid_pre")[0], seen["x"][0])


def test_capture_keeps_the_token_id_of_every_row(llama_adapter, tmp_path):
    """Each row's token id comes from the tokenization the capture ran on (the feature report's example tokens read it
    instead of tokenizing again); a set read back from disk does not know it."""
    hook = "blocks.1.hook_resid_pre"
    batch = llama_adapter.tokenize(PROMPTS[:6])
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
    full = capture(llama_adapter, PROMPTS[:6], hook, positions="all", batch_size=4, progress=False)
    assert [full.token_id[full.prompt_index == i].tolist() for i in range(6)] == rows
    last = capture(llama_adapter, PROMPTS[:6], hook, batch_size=4, progress=False)
    assert last.token_id.tolist() == [row[-1] for row in rows]
    tail = capture(llama_adapter, PROMPTS[:6], hook, positions="post_instruction", batch_size=4, progress=False)
    assert tail.token_id.tolist() == [rows[int(i)][int(p)] for i, p in zip(tail.prompt_index, tail.position, strict=True)]
    assert ActivationSet.load(full.save(tmp_path / "saved")).token_id is None


def test_position_selectors(llama_adapter):
    hook = "blocks.1.hook_resid_pre"
    full = capture(llama_adapter, PROMPTS[:5], hook, positions="all", progress=False)
    lengths = [int(m.sum()) for m in llama_adapter.tokenize(PROMPTS[:5]).attention_mask]
    assert full.activations.shape[0] == sum(lengths)
    first = full.hook(hook)[full.prompt_index == 2]
    mean3 = capture(llama_adapter, PROMPTS[:5], hook, positions=Positions.mean_last(3), progress=False)
    torch.testing.assert_close(mean3.hook(hook)[2], first[-3:].mean(0), atol=1e-6, rtol=0)
    tail = capture(llama_adapter, PROMPTS[:5], hook, positions="post_instruction", progress=False)
    assert tail.position_labels == [-2, -1]
    assert tail.per_prompt(hook).shape == (5, 2, llama_adapter.d_model)
    torch.testing.assert_close(tail.at_position(hook, -2)[2], first[-2])
    with pytest.raises(FeatsteerError, match="unknown position"):
        Positions.parse("middle")
    # a window longer than one prompt is an error whether or not a longer prompt pads it (it averaged padding)
    short, long = "Hi", "a much longer instruction than the other one"
    k = len(llama_adapter.tokenize([short]).input_ids[0]) + 1
    for prompts in ([short], [short, long]):
        with pytest.raises(FeatsteerError, match=f"mean_last:{k} is longer than a prompt \\({k - 1} tokens\\)"):
            capture(llama_adapter, prompts, hook, positions=Positions.mean_last(k), progress=False)


def test_mean_last_of_a_bfloat16_model_is_not_rounded_to_bfloat16():
    """The window's mean was taken in the model's dtype: a bfloat16 model's mean_last rows, stored in float32, were off
    from the mean of the very activations `all` stores by bfloat16's rounding (about 1e-4 at these values)."""
    from featsteer.models import load_model
    from featsteer.testing import tiny_model

    model, tokenizer = tiny_model("llama")
    adapter = load_model(model.to(torch.bfloat16), tokenizer=tokenizer)
    hook, prompts = "blocks.2.hook_resid_post", ["hello there how are you", "tell me a story"]
    every = capture(adapter, prompts, hook, positions="all", progress=False)
    window = capture(adapter, prompts, hook, positions="mean_last:8", progress=False)
    for i in range(len(prompts)):
        expected = every.hook(hook)[every.prompt_index == i][-8:].double().mean(0)
        torch.testing.assert_close(window.hook(hook)[i].double(), expected, atol=1e-6, rtol=0)


def test_an_end_of_sequence_token_the_tokenizer_appends_is_no_part_of_a_prompt():
    """A tokenizer that appends EOS when it adds special tokens (Llama's with add_eos_token=True) ended every prompt of the
    plain-text template, and every raw text, with EOS: `last` read the EOS token and post_instruction lost the template's
    first token for it. Prompts keep the BOS and stop where the model goes on."""
    from tokenizers import processors

    from featsteer.models import load_model
    from featsteer.testing import byte_tokenizer, tiny_model

    model = tiny_model("llama")[0]
    adapters = []
    for single in ("<s> $A", "<s> $A </s>"):
        tokenizer = byte_tokenizer(chat=False)
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
        adapters.append(load_model(model, tokenizer=tokenizer))
    for chat, last in ((True, "\n"), (False, "o")):
        batch = adapters[1].tokenize(["Hello"], chat=chat)
        assert batch.input_ids[0, 0] == 1 and adapters[1].tokenizer.decode(batch.input_ids[0, -1:]) == last
        assert batch.n_post_instruction.tolist() == adapters[0].tokenize(["Hello"], chat=chat).n_post_instruction.tolist()
    hooks = adapters[0].hook_names(("resid_pre",))
    for positions, chat in (("last", True), ("post_instruction", True), ("last", False), ("all", False)):
        with_bos, with_eos = (capture(adapter, PROMPTS[:4], hooks, positions=positions, chat=chat, progress=False) for adapter in adapters)
        assert with_eos.position.tolist() == with_bos.position.tolist()
        assert torch.equal(with_eos.activations, with_bos.activations), (positions, chat)


def test_instruction_end_is_the_instructions_last_token(llama_adapter):
    hook = "blocks.1.hook_resid_pre"
    prompts = PROMPTS[:6]
    batch = llama_adapter.tokenize(prompts)
    tails = batch.n_post_instruction.tolist()
    assert min(tails) >= 1
    full = capture(llama_adapter, prompts, hook, positions="all", progress=False)
    end = capture(llama_adapter, prompts, hook, positions="instruction_end", batch_size=4, progress=False)
    assert str(Positions.parse("instruction_end")) == "instruction_end"
    assert end.position_labels == sorted({-(t + 1) for t in tails})
    assert end.prompt_index.tolist() == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        ids = llama_adapter.tokenize([prompt]).input_ids[0].tolist()
        text = llama_adapter.format_prompts([prompt])[0]
        column = len(ids) - tails[i] - 1
        # the token at that column is the last one that starts inside the instruction
        offsets = llama_adapter.tokenizer(text.text, add_special_tokens=not text.uses_chat_template,
                                          return_offsets_mapping=True)["offset_mapping"]
        assert offsets[column][0] < text.instruction_end <= offsets[column + 1][0]
        rows = full.hook(hook)[full.prompt_index == i]
        torch.testing.assert_close(end.hook(hook)[i], rows[column], atol=1e-5, rtol=0)
    with pytest.raises(FeatsteerError, match="instruction_end needs a chat template"):
        capture(llama_adapter, prompts, hook, positions="instruction_end", chat=False, progress=False)


def test_float64_statistics(llama_adapter):
    hook = "blocks.2.hook_resid_post"
    acts = capture(llama_adapter, PROMPTS, hook, batch_size=5, covariance=True, progress=False)
    values = acts.hook(hook).double()
    torch.testing.assert_close(acts.stats[hook].mean, values.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(acts.stats[hook].covariance, torch.cov(values.T), atol=1e-5, rtol=1e-5)
    assert acts.stats[hook].mean.dtype == torch.float64 and acts.stats[hook].count == len(PROMPTS)


def test_a_set_records_how_its_prompts_were_formatted(llama_adapter, tmp_path):
    hook = "blocks.1.hook_resid_pre"
    acts = capture(llama_adapter, PROMPTS, hook, system="Be brief.", progress=False)
    acts.save(tmp_path / "saved")
    streamed = capture(llama_adapter, PROMPTS, hook, chat=False, progress=False, stream_to=tmp_path / "raw")
    assert (acts.chat, acts.system) == (True, "Be brief.")
    assert (ActivationSet.load(tmp_path / "saved").chat, ActivationSet.load(tmp_path / "saved").system) == (True, "Be brief.")
    assert (streamed.chat, streamed.system) == (False, None)
    assert json.loads((tmp_path / "raw" / "metadata.json").read_text())["chat"] is False


def test_a_set_records_its_provenance(llama_adapter, tmp_path):
    """Beyond the model's name and how the prompts were formatted, a set records what else its rows depend on: the prompts'
    hash and source, the prompt layout the chat template gave them, the model's dtype and the stored one."""
    from featsteer.datasets import builtin_prompts

    hook = "blocks.1.hook_resid_pre"
    prompts = builtin_prompts("harmful", "test").head(5)
    acts = capture(llama_adapter, prompts, hook, system="Be brief.", dtype=torch.bfloat16, progress=False)
    streamed = capture(llama_adapter, list(prompts), hook, chat=False, progress=False, stream_to=tmp_path / "raw")
    acts.save(tmp_path / "saved")
    recorded = acts.provenance
    assert recorded["prompts_sha256"] == prompts.sha256 and recorded["prompt_source"] == prompts.source
    assert recorded["template"] == "<|system|>Be brief.<|end|><|user|>{instruction}<|end|><|assistant|>"
    assert recorded["fallback_template"] is False
    assert (recorded["model_family"], recorded["model_dtype"], recorded["stored_dtype"]) == ("llama", "float32", "bfloat16")
    assert set(recorded["versions"]) == {"featsteer", "torch", "transformers"}
    assert ActivationSet.load(tmp_path / "saved").provenance == recorded
    on_disk = json.loads((tmp_path / "raw" / "metadata.json").read_text())["provenance"]
    assert on_disk == streamed.provenance and on_disk["prompts_sha256"] == prompts.sha256
    assert (on_disk["template"], on_disk["fallback_template"], on_disk["prompt_source"]) == (None, None, None)


def test_capture_provenance_fingerprints_the_weights(llama_adapter):
    """Capture named the model only by name (the path as typed), which an edited or retrained model at the same path
    shares: the provenance now holds a fingerprint of the weights, which an edit changes and its revert restores."""
    from featsteer.edits import apply_edit
    from featsteer.models import weights_fingerprint
    from featsteer.testing import random_direction

    hook = "blocks.1.hook_resid_pre"
    plain = capture(llama_adapter, PROMPTS, hook, progress=False).provenance["weights_fingerprint"]
    assert plain == weights_fingerprint(llama_adapter) and len(plain) == 16
    with apply_edit(llama_adapter, random_direction(llama_adapter.d_model)):
        edited = capture(llama_adapter, PROMPTS, hook, progress=False).provenance["weights_fingerprint"]
    assert edited != plain and capture(llama_adapter, PROMPTS, hook, progress=False).provenance["weights_fingerprint"] == plain


def test_covariance_survives_save_load_and_streaming(llama_adapter, tmp_path):
    hook = "blocks.2.hook_resid_post"
    acts = capture(llama_adapter, PROMPTS, hook, positions="post_instruction", covariance=True, progress=False)
    acts.save(tmp_path / "saved")
    streamed = capture(llama_adapter, PROMPTS, hook, positions="post_instruction", covariance=True, progress=False,
                       stream_to=tmp_path / "streamed")
    for loaded in (ActivationSet.load(tmp_path / "saved"), streamed):
        assert loaded.stats.keys() == acts.stats.keys()
        for key, moments in acts.stats.items():  # bit-identical, per position label too
            assert torch.equal(loaded.stats[key].covariance, moments.covariance) and loaded.stats[key].count == moments.count
    plain = capture(llama_adapter, PROMPTS, hook, progress=False)
    plain.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="capture with covariance=True"):
        _ = ActivationSet.load(tmp_path / "plain").stats[hook].covariance


def test_nan_activations_name_hook_and_prompt(llama_adapter):
    with torch.no_grad():
        llama_adapter.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FeatsteerError, match=r"NaN/inf\) at blocks\.1\.hook_resid_post for prompt #\d+ \('instruction"):
        capture(llama_adapter, PROMPTS, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"], progress=False)


def test_float16_overflow_is_an_error_not_inf(llama_adapter, tmp_path):
    with torch.no_grad():
        llama_adapter.layers[0].mlp.down_proj.weight.mul_(1e8)  # finite in float32, beyond float16's 65504
    hook = "blocks.0.hook_resid_post"
    assert torch.isfinite(capture(llama_adapter, PROMPTS, hook, progress=False).activations).all()
    assert capture(llama_adapter, PROMPTS, hook, dtype=torch.bfloat16, progress=False).activations.dtype == torch.bfloat16
    message = r"at blocks\.0\.hook_resid_post for prompt #\d+ \('instruction.* beyond float16's range \(largest 65504\): capture with dtype=torch.float32 or torch.bfloat16"
    with pytest.raises(FeatsteerError, match=message):
        capture(llama_adapter, PROMPTS, hook, dtype=torch.float16, progress=False)
    with pytest.raises(FeatsteerError, match=message):
        capture(llama_adapter, PROMPTS, hook, dtype=torch.float16, progress=False, stream_to=tmp_path / "acts")
    assert not (tmp_path / "acts").exists()


def test_capture_stops_after_the_deepest_hook(llama_adapter):
    calls = []
    handle = llama_adapter.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        capture(llama_adapter, PROMPTS, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_bad_inputs(llama_adapter):
    with pytest.raises(FeatsteerError, match="prompt list is empty"):
        capture(llama_adapter, [], "blocks.0.hook_resid_pre")
    with pytest.raises(FeatsteerError, match="unknown hook name"):
        capture(llama_adapter, PROMPTS, "blocks.0.resid")
    acts = capture(llama_adapter, PROMPTS[:2], "blocks.0.hook_resid_pre", progress=False)
    with pytest.raises(FeatsteerError, match="was not captured"):
        acts.hook("blocks.1.hook_resid_pre")
    # an empty raw text has no token (the byte tokenizer adds no BOS): alone it crashed inside the model, and beside
    # other texts its row was a pad token's activation
    for texts in ([""], ["", "hello"]):
        with pytest.raises(FeatsteerError, match="the text '' tokenizes to no tokens"):
            capture(llama_adapter, texts, "blocks.1.hook_resid_pre", chat=False, progress=False)
    assert len(capture(llama_adapter, [""], "blocks.1.hook_resid_pre", progress=False)) == 1  # the chat template has tokens


def test_a_stored_dtype_that_cannot_hold_activations_is_an_error(llama_adapter, tmp_path):
    """An integer or bool dtype stored every activation truncated (zeros, or True) without an error."""
    for dtype in (torch.int8, torch.int64, torch.bool, "float16"):
        with pytest.raises(FeatsteerError, match=f"dtype={re.escape(repr(dtype))} cannot hold activations"):
            capture(llama_adapter, ["hello"], "blocks.1.hook_resid_pre", dtype=dtype, stream_to=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_per_prompt_needs_the_same_positions_for_every_prompt(llama_adapter):
    """For a set whose prompts hold different position labels, per_prompt failed inside torch.stack."""
    hook = "blocks.1.hook_resid_pre"
    full = capture(llama_adapter, ["hi", "a longer prompt"], hook, positions="all", progress=False)
    with pytest.raises(FeatsteerError, match="per_prompt needs the same positions for every prompt, but position .* is held by 1 of 2"):
        full.per_prompt(hook)
    tail = capture(llama_adapter, ["hi", "a longer prompt"], hook, positions="post_instruction", progress=False)
    assert tail.per_prompt(hook).shape == (2, len(tail.position_labels), llama_adapter.d_model)


def test_a_prompt_that_is_not_text_is_an_error(llama_adapter):
    """A missing cell of a table (None, or NaN from pandas) was captured as the text 'None' or 'nan', silently."""
    for bad, shown in ((None, "None (NoneType)"), (float("nan"), "nan (float)"), (b"hi", "b'hi' (bytes)")):
        with pytest.raises(FeatsteerError, match=f"prompt #1 is {re.escape(shown)}, not text"):
            capture(llama_adapter, ["hello", bad, "there"], "blocks.1.hook_resid_pre", progress=False)


def test_an_activation_folder_of_another_format_version_is_refused(llama_adapter, tmp_path):
    """The reader ignored `format_version`: a folder written in a later layout would have been read as this one."""
    import shutil

    capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", stream_to=tmp_path / "s", progress=False)
    assert len(ActivationReader(tmp_path / "s")) == len(PROMPTS)
    for version in (2, "1", None):
        shutil.copytree(tmp_path / "s", tmp_path / f"v{version}")
        meta_file = tmp_path / f"v{version}" / "metadata.json"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, "format_version": version} if version is not None else
                                        {k: v for k, v in meta.items() if k != "format_version"}))
        with pytest.raises(FeatsteerError, match=rf"says format_version {re.escape(repr(version))}, but this featsteer reads activation format 1"):
            ActivationReader(tmp_path / f"v{version}")


def test_save_load_round_trip_is_bit_identical(llama_adapter, tmp_path):
    acts = capture(llama_adapter, PROMPTS, llama_adapter.hook_names(), label="harmful", progress=False)
    acts.save(tmp_path / "acts")
    loaded = ActivationSet.load(tmp_path / "acts")
    assert torch.equal(loaded.activations, acts.activations)
    assert loaded.prompts == acts.prompts and loaded.hook_names == acts.hook_names and loaded.label == "harmful"
    assert torch.equal(loaded.stats["blocks.1.hook_resid_pre"].mean, acts.stats["blocks.1.hook_resid_pre"].mean)
    with pytest.raises(FeatsteerError, match="already exists"):
        acts.save(tmp_path / "acts")


def test_streaming_shards_and_batched_reader(llama_adapter, tmp_path):
    hooks = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    in_memory = capture(llama_adapter, PROMPTS, hooks, positions="all", progress=False)
    streamed = capture(llama_adapter, PROMPTS, hooks, positions="all", stream_to=tmp_path / "s", shard_rows=64, progress=False)
    reader = ActivationReader(tmp_path / "s")
    assert len(reader.metadata["shards"]) > 2 and len(reader) == in_memory.activations.shape[0]
    batches = list(reader.iter_batches(50, hook=hooks[1]))
    assert all(b.shape == (50, llama_adapter.d_model) for b in batches[:-1])
    rows = torch.cat(batches)
    assert rows.shape[0] == len(reader)
    key = lambda s: sorted(zip(s.prompt_index.tolist(), s.position.tolist(), strict=True))  # noqa: E731
    assert key(streamed) == key(in_memory)
    torch.testing.assert_close(rows.double().mean(0), in_memory.hook(hooks[1]).double().mean(0))


def test_failed_streaming_capture_leaves_no_directory(llama_adapter, tmp_path):
    calls = []

    def fail_on_third_batch(x, site):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"), llama_adapter.hooks([("blocks.0.hook_resid_pre", fail_on_third_batch)]):
        capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", batch_size=4, stream_to=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is a glibc call")
def test_heap_trim_returns_freed_memory_to_the_os():
    from featsteer.activations.heap import trim

    def rss() -> int:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024

    # blocks below glibc's mmap threshold, every other one freed: holes inside the heap, which free()
    # alone never hands back (only the top of the heap shrinks), as after many interleaved forward passes
    blocks = [bytearray(b"x" * (64 * 1024)) for _ in range(1500)]  # ~96 MB, pages touched
    del blocks[::2]
    before = rss()
    assert trim() is True
    assert rss() < before - 24 * 1024 * 1024
    del blocks


def _is_own_mapping(nbytes: int) -> bool:
    """Whether glibc serves a `nbytes` malloc with an mmap of its own (mallinfo2's count of mmapped blocks)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    block = libc.malloc(nbytes)
    try:
        return libc.mallinfo2().hblks > before
    finally:
        libc.free(block)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 and mallopt are glibc calls")
def test_capture_leaves_glibc_free_to_reuse_heap_pages_afterwards(llama_adapter, monkeypatch):
    monkeypatch.delenv("FEATSTEER_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    capture(llama_adapter, PROMPTS[:4], "blocks.1.hook_resid_pre", batch_size=2, progress=False)
    # a 24 MiB block comes from the heap, whose pages are reused, not from a fresh mapping the kernel faults in and
    # zeroes page by page (kept pinned at 128 KiB, every later forward pass and generation paid that as system time)
    assert not _is_own_mapping(24 << 20)


def test_the_mmap_threshold_is_pinned_inside_the_outermost_block_only(monkeypatch):
    from featsteer.activations import heap

    calls = []
    monkeypatch.setattr(heap, "_libc_function", lambda name, argtypes: lambda *args: calls.append(args) or 1)
    for variable in ("FEATSTEER_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(variable, raising=False)
    with heap.fragmentation_limited() as pinned, heap.fragmentation_limited() as nested:
        assert pinned and nested and calls == [(heap.M_MMAP_THRESHOLD, 128 * 1024)]  # a capture inside one keeps the pin
    assert calls[1:] == [(heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_TRIM_THRESHOLD, 64 << 20)]  # glibc's own ceiling
    # the user's own mmap or trim threshold (either turns glibc's dynamic thresholds off): releasing the pin to glibc's
    # dynamic ceiling would override it, as it overrode MALLOC_TRIM_THRESHOLD_ and GLIBC_TUNABLES
    for variable, value in (("FEATSTEER_MALLOC_TUNING", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                            ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")):
        calls.clear()
        with monkeypatch.context() as patch:
            patch.setenv(variable, value)
            with heap.fragmentation_limited() as pinned:
                assert not pinned
        assert calls == []  # the user's choice: the allocator is left alone


def test_a_capture_starting_while_another_thread_releases_the_pin_runs_pinned(monkeypatch):
    """Two threads capturing at once share the allocator: one that entered while the other was releasing the pin counted
    itself in, pinned, and then had the pin released under it by the other's late `mallopt` calls."""
    import threading

    from featsteer.activations import heap

    state = {"threshold": None}
    entered, inside, leave = threading.Event(), threading.Event(), threading.Event()

    def second_capture() -> None:
        with heap.fragmentation_limited():
            inside.set()
            leave.wait()

    def mallopt(parameter: int, value: int) -> int:
        if parameter == heap.M_MMAP_THRESHOLD:
            if value == heap.RELEASED_MMAP_THRESHOLD_BYTES and not entered.is_set():  # the first capture is leaving
                entered.set()
                threading.Thread(target=second_capture, daemon=True).start()
                inside.wait(0.5)  # the second capture enters before this call takes effect, unless the pin's lock stops it
            state["threshold"] = value
        return 1

    monkeypatch.setattr(heap, "_libc_function", lambda name, argtypes: mallopt)
    for variable in ("FEATSTEER_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(variable, raising=False)
    with heap.fragmentation_limited():
        pass
    assert inside.wait(30)
    try:
        assert state["threshold"] == heap.MMAP_THRESHOLD_BYTES  # still pinned while the second capture runs
    finally:
        leave.set()


def test_all_tokens_from_an_index_skip_each_prompts_first_tokens(llama_adapter, tmp_path):
    hook = "blocks.1.hook_resid_pre"
    full = capture(llama_adapter, PROMPTS[:4], hook, positions="all", progress=False)
    tail = capture(llama_adapter, PROMPTS[:4], hook, positions="all:3", progress=False)
    assert str(Positions.parse("all:3")) == "all:3" and Positions.parse("all:0") == Positions.all_tokens()
    assert tail.position.min() == 3
    for prompt in range(4):
        expected = full.hook(hook)[(full.prompt_index == prompt) & (full.position >= 3)]
        torch.testing.assert_close(tail.hook(hook)[tail.prompt_index == prompt], expected)
    with pytest.raises(FeatsteerError, match="integer"):
        Positions.parse("all:x")
    with pytest.raises(FeatsteerError, match="N >= 0"):
        Positions.parse("all:-1")
    for stream_to in (None, tmp_path / "past"):  # past every prompt: the same one-line error in memory as on disk
        with pytest.raises(FeatsteerError, match=r"nothing was captured \(0 rows\).*all:N past every prompt"):
            capture(llama_adapter, PROMPTS[:4], hook, positions="all:10000", progress=False, stream_to=stream_to)


def test_directions_are_found_and_selected_at_the_instruction_end(llama_adapter):
    from featsteer.datasets import PromptSet
    from featsteer.directions import difference_in_means
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    harmful = PromptSet(tuple(f"harmful request {i} " + "bad " * (i % 3) for i in range(12)), "harmful")
    harmless = PromptSet(tuple(f"kind question {i} " + "good " * (i % 4) for i in range(12)), "harmless")
    config = DirectionConfig(positions="instruction_end", n_select=3, top_k=2, batch_size=5)
    result = find_refusal_direction(llama_adapter, harmful, harmless, config, keep_activations=True)
    label = -(int(llama_adapter.tokenize(["x"]).n_post_instruction[0]) + 1)
    assert set(result.candidates.positions) == {label}
    assert result.selection.chosen.position == label
    train_harmful, train_harmless = result.train
    hooks = llama_adapter.hook_names(("resid_pre",))
    expected = difference_in_means(*(capture(llama_adapter, list(p), hooks, positions="instruction_end", progress=False)
                                     for p in (train_harmful, train_harmless)))
    for hook in hooks[1:]:
        torch.testing.assert_close(result.candidates.direction(hook, label), expected.direction(hook, label))


def test_progress_bars_follow_the_models_show_progress(llama_adapter, capsys):
    """`progress=None` (the default) reads `model.show_progress`: one switch quiets every bar; an explicit value wins."""
    prompts = [f"prompt number {i}" for i in range(8)]
    hook = ["blocks.0.hook_resid_pre"]
    llama_adapter.show_progress = False
    capture(llama_adapter, prompts, hook, batch_size=1)
    assert "capture" not in capsys.readouterr().err
    capture(llama_adapter, prompts, hook, batch_size=1, progress=True)
    assert "capture" in capsys.readouterr().err
    llama_adapter.show_progress = True
    capture(llama_adapter, prompts, hook, batch_size=1)
    assert "capture" in capsys.readouterr().err


def test_streamed_capture_reads_back_in_prompt_order_and_can_stay_on_disk(llama_adapter, tmp_path):
    hooks = ["blocks.1.hook_resid_pre"]
    in_memory = capture(llama_adapter, PROMPTS, hooks, progress=False)
    streamed = capture(llama_adapter, PROMPTS, hooks, stream_to=tmp_path / "s", batch_size=2, progress=False)
    # the batches ran shortest prompt first; the set read back is in prompt order all the same, row for row
    assert streamed.prompt_index.tolist() == list(range(len(PROMPTS)))
    torch.testing.assert_close(streamed.activations, in_memory.activations, atol=1e-5, rtol=1e-5)
    reader = capture(llama_adapter, PROMPTS, hooks, stream_to=tmp_path / "r", progress=False, load_back=False)
    assert isinstance(reader, ActivationReader) and len(reader) == len(PROMPTS)
    with pytest.raises(FeatsteerError, match="holds no activations at blocks.0.hook_resid_pre"):
        next(reader.iter_batches(4, hook="blocks.0.hook_resid_pre"))
    with pytest.raises(FeatsteerError, match="batch_size must be at least 1"):
        next(reader.iter_batches(0))


def test_an_activation_folder_never_replaces_other_files(llama_adapter, tmp_path):
    victim = tmp_path / "thesis"
    victim.mkdir()
    (victim / "thesis.tex").write_text("precious")
    with pytest.raises(FeatsteerError, match="not empty"):
        capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", stream_to=victim, progress=False)
    assert (victim / "thesis.tex").read_text() == "precious" and [p.name for p in victim.iterdir()] == ["thesis.tex"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FeatsteerError, match="existing file"):
        capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", stream_to=tmp_path / "afile", progress=False)
    (tmp_path / "empty").mkdir()  # an empty folder made for the output is fine
    assert len(capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", stream_to=tmp_path / "empty", progress=False)) == len(PROMPTS)
    with pytest.raises(FeatsteerError, match="shard_rows must be at least 1"):
        capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", stream_to=tmp_path / "zero", shard_rows=0, progress=False)
    with pytest.raises(FeatsteerError, match="0 rows"):
        capture(llama_adapter, PROMPTS, "blocks.1.hook_resid_pre", positions="all:1000", stream_to=tmp_path / "none", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "thesis"]  # no partial folder left behind


def test_position_kinds_without_an_argument_reject_one():
    for text in ("last:3", "post_instruction:7", "instruction_end:x"):
        with pytest.raises(FeatsteerError, match="takes no ':' argument"):
            Positions.parse(text)
    assert Positions.parse("mean_last:3").k == 3 and Positions.parse("all:2").start == 2


def _merging_tokenizer():
    """A byte-level tokenizer without a chat template whose one merge joins a space and a newline, so an instruction
    ending in a space shares its last token with the fallback template's first newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    vocab.update({c: i + 4 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    vocab["ĠĊ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "Ċ")], unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_post_instruction_rows_do_not_depend_on_the_batch():
    """A prompt keeps the template tokens every prompt of the set has, whichever prompts share its batch (it took the
    batch's fewest, so a prompt beside one whose last token merged into the template lost a row)."""
    from featsteer.models import load_model
    from featsteer.testing import tiny_model

    adapter = load_model(tiny_model("llama")[0], tokenizer=_merging_tokenizer())
    texts = ["Say hi", "Say bye ", "Say it"]
    assert adapter.tokenize(texts).n_post_instruction.tolist() == [16, 15, 16]  # "\n\n### Response:\n", less the merged newline
    hook = "blocks.1.hook_resid_pre"
    apart = [capture(adapter, texts, hook, positions="post_instruction", batch_size=1, max_batch_tokens=None, progress=False),
             capture(adapter, texts, hook, positions="post_instruction", batch_size=2, max_batch_tokens=None, progress=False)]
    together = capture(adapter, texts, hook, positions="post_instruction", batch_size=3, progress=False)
    for acts in apart:
        assert acts.position_labels == together.position_labels == list(range(-15, 0))
        torch.testing.assert_close(acts.per_prompt(hook), together.per_prompt(hook), atol=1e-5, rtol=0)


def _merging_adapter():
    """A tiny Llama without a chat template (the plain-text fallback) whose tokenizer merges a space with a newline, so a
    prompt ending in a space has one template token fewer after it, as BPE tokenizers of base models do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from featsteer.models import load_model
    from featsteer.models.loading import model_class
    from featsteer.testing import SPECIALS, _configs

    vocab = {token: i for i, token in enumerate(SPECIALS[:4])}
    vocab.update({c: i + 4 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    vocab["ĠĊ"] = len(vocab)  # " \n"
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "Ċ")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=SPECIALS[4:])
    tokenizer.padding_side = "left"
    config = _configs(len(tokenizer))["llama"]()
    torch.manual_seed(0)
    model = model_class(config).from_config(config, attn_implementation="eager").eval()
    return load_model(model, tokenizer=tokenizer)


def test_directions_compare_prompts_only_where_every_prompt_was_read():
    """instruction_end labels each prompt by its own tail: prompts whose end merges with the template sit at another
    label, and a direction there averaged only them (silently). post_instruction sets captured separately can hold
    different numbers of template tokens: the labels both hold are compared (one set's extra label used to fail)."""
    from featsteer.directions import difference_in_means, find_directions

    adapter = _merging_adapter()
    tails = [int(adapter.tokenize([text]).n_post_instruction[0]) for text in ("request", "request ")]
    assert tails[1] == tails[0] - 1
    hooks = adapter.hook_names(("resid_pre",))
    harmful = [f"harmful request {i}" + (" " if i % 3 == 0 else "") for i in range(9)]
    harmless = [f"kind question {i}" + (" " if i % 4 == 0 else "") for i in range(9)]
    ends = [capture(adapter, prompts, hooks, positions="instruction_end", progress=False) for prompts in (harmful, harmless)]
    assert len(ends[0].position_labels) == 2 and len(ends[0].at_position(hooks[1], ends[0].position_labels[1])) < len(harmful)
    for method in ("dim", "svd", "linear"):
        with pytest.raises(FeatsteerError, match="different positions for different prompts"):
            find_directions(*ends, method=method)
    clean = [[p.rstrip() for p in prompts] for prompts in (harmful, harmless)]
    post = [capture(adapter, prompts, hooks, positions="post_instruction", progress=False) for prompts in (clean[0], harmless)]
    assert len(post[1].position_labels) == len(post[0].position_labels) - 1  # the harmless set has a shorter tail
    found = difference_in_means(*post)
    assert sorted(set(found.positions)) == post[1].position_labels
    for position in post[1].position_labels:
        expected = post[0].at_position(hooks[2], position).double().mean(0) - post[1].at_position(hooks[2], position).double().mean(0)
        torch.testing.assert_close(found.direction(hooks[2], position).double(), expected / expected.norm(), atol=1e-6, rtol=0)
    assert sorted(set(find_directions(*post, method="svd").positions)) == post[1].position_labels
