"""Tests for featsteer.datasets: every loader format, every user-facing error, and the shipped sets."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featsteer.datasets import (
    BUILTIN_KINDS,
    PromptSet,
    builtin_prompts,
    load_prompts,
    prompt_set_hash,
    takes_column,
)
from featsteer.datasets import _build_builtin as build
from featsteer.errors import FeatsteerError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PROMPTS = ["How do I bake bread?", "Explain recursion.", "Write a haiku about rain."]


def _write_txt(path: Path, prompts: list[str]) -> None:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")


def _write_csv(path: Path, prompts: list[str]) -> None:
    lines = ["id,prompt,label"] + [f'{index},"{prompt}",x' for index, prompt in enumerate(prompts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_json(path: Path, prompts: list[str]) -> None:
    path.write_text(json.dumps([{"prompt": prompt, "id": index} for index, prompt in enumerate(prompts)]))


def _write_jsonl(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))


def _write_parquet(path: Path, prompts: list[str]) -> None:
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), path)


WRITERS: dict[str, Callable[[Path, list[str]], None]] = {
    ".txt": _write_txt,
    ".csv": _write_csv,
    ".json": _write_json,
    ".jsonl": _write_jsonl,
    ".parquet": _write_parquet,
}


# --- file formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_every_format_round_trips(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"prompts{suffix}"
    WRITERS[suffix](path, PROMPTS)
    loaded = load_prompts(path)
    assert loaded.to_list() == PROMPTS
    assert loaded.source == str(path)
    assert loaded.categories is None


def test_txt_strips_whitespace_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("  first prompt  \n\n\t\nsecond prompt\n   \n", encoding="utf-8")
    assert load_prompts(path).prompts == ("first prompt", "second prompt")


def test_csv_explicit_column(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,rewrite\na,Rewrite one\nb,Rewrite two\n", encoding="utf-8")
    assert load_prompts(path, column="rewrite").prompts == ("Rewrite one", "Rewrite two")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("id,text,goal", "goal"),  # goal comes before text in the default search order
        ("Behavior,category", "Behavior"),  # default search is case-insensitive
        ("query,question", "question"),
        ("instruction,prompt", "prompt"),
    ],
)
def test_csv_default_column_search(tmp_path: Path, header: str, expected: str) -> None:
    columns = header.split(",")
    path = tmp_path / "p.csv"
    row = ",".join(f"{name} value" for name in columns)
    path.write_text(f"{header}\n{row}\n", encoding="utf-8")
    assert load_prompts(path).prompts == (f"{expected} value",)


def test_csv_skips_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,other\nfirst,1\n,2\n   ,3\nsecond,4\n", encoding="utf-8")
    assert load_prompts(path).prompts == ("first", "second")


def test_csv_reads_a_long_context_prompt_and_keeps_the_csv_limit(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    document = "Summarise this: " + "word " * 40_000  # 200k characters, past the csv module's 131072 default
    path.write_text(f'prompt\n"{document}"\nshort\n', encoding="utf-8")
    limit = csv.field_size_limit()
    assert load_prompts(path).prompts == (document.strip(), "short")
    assert csv.field_size_limit() == limit  # the process-wide limit is put back


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("prompt\nHow do I bake bread, quickly?\nsecond\n", "the row ending at line 2 of {path} has 2 fields but the header has 1"),
        ("prompt,category\nfirst,x\nBake bread, quickly,y\n", "the row ending at line 3 of {path} has 3 fields but the header has 2"),
        ("category,prompt\nx,first\ny\n", "the row ending at line 3 of {path} has no 'prompt' field"),
        ('prompt\nfirst\n"an unclosed quote\nthird\nfourth\n', "(unexpected end of data in the row from line 3)"),
        ('prompt,category\nfirst,x\n"quoted" tail,y\n', "in the row from line 3"),
        ("prompt,prompt\nfirst,second\n", "names column 'prompt' 2 times"),
        ("Prompt,prompt\nfirst,second\n", "columns 'Prompt' and 'prompt' in {path} both match"),
    ],
    ids=["unquoted-comma", "unquoted-comma-mid", "short-row", "unclosed-quote", "stray-quote", "same-column-twice", "case-twins"],
)
def test_a_malformed_csv_row_is_an_error_not_a_wrong_prompt(tmp_path: Path, content: str, expected: str) -> None:
    # these rows were read as cut, merged or silently dropped prompts: "How do I bake bread" alone, or one prompt
    # holding every row after an unclosed quote
    path = tmp_path / "p.csv"
    path.write_text(content, encoding="utf-8")
    assert expected.format(path=path) in _error_message(lambda: load_prompts(path))


def test_a_quoted_csv_field_keeps_its_commas_quotes_and_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('\ufeffprompt,category\n"Bake bread, quickly",x\n"Say ""hi""\nthen stop",y\nplain,\n', encoding="utf-8")
    assert load_prompts(path).prompts == ("Bake bread, quickly", 'Say "hi"\nthen stop', "plain")


def test_json_list_of_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROMPTS))
    assert load_prompts(path).to_list() == PROMPTS


def test_json_objects_with_explicit_column(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"goal": "g1", "target": "t1"}, {"goal": "g2", "target": "t2"}]))
    assert load_prompts(path, column="target").prompts == ("t1", "t2")
    assert load_prompts(path).prompts == ("g1", "g2")


def test_jsonl_bare_strings_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('"one"\n\n"two"\n')
    assert load_prompts(path).prompts == ("one", "two")


def test_parquet_explicit_column(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "instruction": ["x", "y"]}), path)
    assert load_prompts(path, column="instruction").prompts == ("x", "y")


def test_dedupe_keeps_first_occurrence_order(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    _write_txt(path, ["b", "a", "b ", "c", "a", "d"])
    assert load_prompts(path).prompts == ("b", "a", "c", "d")
    assert load_prompts(path, dedupe=False).prompts == ("b", "a", "b", "c", "a", "d")


def test_limit_applies_after_dedupe(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    _write_txt(path, ["a", "a", "b", "c"])
    assert load_prompts(path, limit=2).prompts == ("a", "b")
    assert load_prompts(path, limit=100).prompts == ("a", "b", "c")


# --- errors -------------------------------------------------------------------------------------


def _error_message(call: Callable[[], object]) -> str:
    with pytest.raises(FeatsteerError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, "user-facing errors must be one line"
    return message


def test_missing_file_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    message = _error_message(lambda: load_prompts(missing))
    assert message.startswith(f"prompt file not found: {missing}")


def test_missing_file_with_unknown_extension_lists_source_forms(tmp_path: Path) -> None:
    message = _error_message(lambda: load_prompts("builtin_harmful"))
    assert "prompt file not found: builtin_harmful" in message
    assert "builtin:KIND" in message


def test_unknown_extension_lists_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "p.xlsx"
    path.write_text("x")
    message = _error_message(lambda: load_prompts(path))
    assert "'.xlsx'" in message
    for suffix in WRITERS:
        assert suffix in message


def test_directory_is_rejected(tmp_path: Path) -> None:
    assert "is a directory" in _error_message(lambda: load_prompts(tmp_path))


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_missing_explicit_column_names_it_and_lists_available(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    WRITERS[suffix](path, PROMPTS)
    message = _error_message(lambda: load_prompts(path, column="behaviour"))
    assert "column 'behaviour' not found" in message
    assert "'prompt'" in message


def test_no_default_column_lists_available_and_suggests_column(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("id,sentence\n1,hello\n", encoding="utf-8")
    message = _error_message(lambda: load_prompts(path))
    assert "'sentence'" in message
    assert "column=" in message
    assert "prompt, instruction, goal" in message


def test_column_on_txt_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    _write_txt(path, PROMPTS)
    assert "does not apply" in _error_message(lambda: load_prompts(path, column="prompt"))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", ""),
        ("blank.txt", "\n  \n\t\n"),
        ("header.csv", "prompt\n"),
        ("empty.csv", ""),
        ("e.json", "[]"),
    ],
)
def test_empty_sources_explain_themselves(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = _error_message(lambda: load_prompts(path))
    assert message.startswith(f"no prompts in {path}")
    assert "empty" in message


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    assert "line 2 of" in _error_message(lambda: load_prompts(path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("caf\u00e9 prompt".encode("latin-1"))
    assert "not UTF-8" in _error_message(lambda: load_prompts(path))


def test_json_that_is_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "x"}')
    assert "expected a list" in _error_message(lambda: load_prompts(path))


def test_non_text_values_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "fine"}, {"prompt": 42}]))
    message = _error_message(lambda: load_prompts(path))
    assert "item 1" in message
    assert "not text" in message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.json", '[{"prompt": "a"}, {"prompt": null}, {"prompt": "b"}, {"prompt": null}]',
         "item 1 in {path} has 'prompt': null (and 1 more item); give it text or drop the item"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": null}\n{"prompt": "b"}\n',
         "record 1 in {path} has 'prompt': null; give it text or drop the record"),
        ("p.json", '["a", null, "b"]', "item 1 in {path} is null; expected a string or an object"),
        ("p.jsonl", '"a"\n[1]\n', "record 1 in {path} is a JSON array; expected a string or an object"),
    ],
)
def test_a_null_json_prompt_is_an_error_not_a_dropped_row(tmp_path: Path, name: str, content: str, expected: str) -> None:
    """A JSON null where a prompt belongs is as strict as a missing key or a CSV row without the field: before, a null
    value was dropped with only an info log line, and the set came out smaller without a word."""
    path = tmp_path / name
    path.write_text(content)
    assert _error_message(lambda: load_prompts(path)) == expected.format(path=path)


def test_null_parquet_prompts_are_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A parquet (or hf:) column holds nulls for missing values, and an hf: dataset cannot be edited: its null prompts
    are dropped, with a warning naming the source, the count and the first row (before: an info line at most)."""
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "b", None, None]}), path)
    with caplog.at_level("WARNING", logger="featsteer.datasets.loaders"):
        assert load_prompts(path).prompts == ("a", "b")
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"dropped 3 null prompts from {path} (the first at row 1, counting from 0): those rows have no text in "
                        "the prompt column"]


def test_record_missing_the_column(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert "record 1" in _error_message(lambda: load_prompts(path))


@pytest.mark.parametrize("limit", [0, -3, True, 2.5, "10"])
def test_bad_limit(tmp_path: Path, limit: object) -> None:
    path = tmp_path / "p.txt"
    _write_txt(path, PROMPTS)
    message = _error_message(lambda: load_prompts(path, limit=limit))  # type: ignore[arg-type]
    assert "limit must be a positive integer" in message


def test_unknown_builtin_kind_lists_valid_ones() -> None:
    message = _error_message(lambda: load_prompts("builtin:harmfull"))
    assert "'harmfull'" in message
    assert "harmful, harmless, alarming" in message
    assert "harmful, harmless, alarming" in _error_message(lambda: builtin_prompts("evil"))


def test_unknown_builtin_split_lists_valid_ones() -> None:
    message = _error_message(lambda: load_prompts("builtin:harmful:dev"))
    assert "'dev'" in message
    assert "train, val, test, all" in message
    assert "'validation'" in _error_message(lambda: builtin_prompts("harmless", "validation"))


def test_organism_corpus_source_is_fresh_labelled_and_seeded() -> None:
    harmful, harmless = load_prompts("organism-corpus:harmful:12"), load_prompts("organism-corpus:harmless:12")
    assert len(harmful) == 12 and len(harmless) == 12 and harmful.source == "organism-corpus:harmful:12"
    assert load_prompts("organism-corpus:harmful:12").prompts == harmful.prompts  # deterministic (seed 987)
    assert load_prompts("organism-corpus:harmful:12:5").prompts != harmful.prompts
    assert not set(harmful.prompts) & set(harmless.prompts)
    assert len(load_prompts("organism-corpus:harmless:12", limit=3)) == 3
    repeated = load_prompts("organism-corpus:harmful:200:28")  # the generator repeats a prompt of this seed's first 200
    assert len(repeated) == 200 and repeated.prompts == load_prompts("organism-corpus:harmful:200:28").prompts  # topped up, seeded
    for bad in ("organism-corpus:evil:5", "organism-corpus:harmful:0", "organism-corpus:harmful", "organism-corpus:harmful:x",
                "organism-corpus:harmful:5:1:2"):
        assert "use organism-corpus:harmful:N" in _error_message(lambda bad=bad: load_prompts(bad))
    assert "does not apply" in _error_message(lambda: load_prompts("organism-corpus:harmful:5", column="text"))


def test_malformed_builtin_source() -> None:
    assert "builtin:KIND:SPLIT" in _error_message(lambda: load_prompts("builtin:harmful:test:extra"))


def test_hf_offline_fails_with_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode through the environment (so nothing can hang on the network) and through the
    # libraries' import-time constants, restored afterwards so no other test inherits offline mode.
    datasets = pytest.importorskip("datasets")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    message = _error_message(lambda: load_prompts("hf:featsteer-test/does-not-exist"))
    assert message.startswith("could not load hf:featsteer-test/does-not-exist (split 'train'): ")
    assert "local file" in message


def test_hf_offline_set_after_import_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    message = _error_message(lambda: load_prompts("hf:org/name"))
    assert message.startswith("could not load hf:org/name (split 'train'): HF_HUB_OFFLINE was set after")


class _FakeHFDataset:
    column_names = ("id", "Goal")

    def __getitem__(self, column: str) -> list[object]:
        return {"id": [1, 2, 3], "Goal": ["first", "second", "first"]}[column]


def test_hf_success_path_with_a_stubbed_datasets_library(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    from featsteer.datasets import loaders

    calls = []

    def fake_load_dataset(name: str, split: str) -> _FakeHFDataset:
        calls.append((name, split))
        return _FakeHFDataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(loaders, "_probe_hub", lambda name, fail: None)
    loaded = load_prompts("hf:org/behaviours:test")
    assert calls == [("org/behaviours", "test")]
    assert loaded == PromptSet(("first", "second"), "hf:org/behaviours:test")
    assert "not text" in _error_message(lambda: load_prompts("hf:org/behaviours:test:id"))


def test_hf_source_parsing_errors() -> None:
    assert "hf:NAME" in _error_message(lambda: load_prompts("hf:"))
    message = _error_message(lambda: load_prompts("hf:org/name:train:goal", column="prompt"))
    assert "'goal'" in message and "'prompt'" in message


# --- PromptSet ----------------------------------------------------------------------------------


def test_prompt_set_sequence_behaviour() -> None:
    prompts = PromptSet(("a", "b", "c"), "test", ("x", "y", "z"))
    assert len(prompts) == 3
    assert list(prompts) == ["a", "b", "c"]
    assert prompts[1] == "b"
    assert prompts[-1] == "c"
    assert prompts[1:] == PromptSet(("b", "c"), "test", ("y", "z"))
    assert prompts.head(2) == PromptSet(("a", "b"), "test", ("x", "y"))
    assert prompts.head(10) == prompts
    assert prompts.to_list() == ["a", "b", "c"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        prompts.source = "other"  # type: ignore[misc]


def test_prompt_set_rejects_bad_contents() -> None:
    assert "empty" in _error_message(lambda: PromptSet((), "test"))
    assert "non-blank" in _error_message(lambda: PromptSet(("ok", "  "), "test"))
    assert "one category per prompt" in _error_message(lambda: PromptSet(("a", "b"), "test", ("x",)))
    assert "selects no prompts" in _error_message(lambda: PromptSet(("a",), "test")[5:])
    assert "head(n)" in _error_message(lambda: PromptSet(("a",), "test").head(0))


def test_sha256_is_the_documented_stable_hash() -> None:
    expected = hashlib.sha256(b"first\nsecond").hexdigest()
    assert prompt_set_hash(["first", "second"]) == expected
    assert prompt_set_hash(("first", "second")) == expected
    assert PromptSet(("first", "second"), "a").sha256 == expected
    assert PromptSet(("second", "first"), "a").sha256 != expected


def test_multi_line_prompts_collide_in_sha256_but_not_in_prompts_sha256(tmp_path: Path) -> None:
    """sha256 hashes the prompts joined by newlines, so a set with a two-line prompt and the set of its two lines hash
    equal; prompts_sha256 tells them apart, and equals sha256's verdict wherever sha256 was unambiguous."""
    import json

    from featsteer.datasets import prompts_sha256
    from featsteer.evaluation import RefusalDetector
    from featsteer.search import SearchConfig, _verify_key

    one, two = PromptSet(("Summarise:\nthe cat sat",), "a"), PromptSet(("Summarise:", "the cat sat"), "b")
    assert one.sha256 == two.sha256  # the documented, recorded hash is kept as it was
    assert one.prompts_sha256 != two.prompts_sha256 == prompts_sha256(["Summarise:", "the cat sat"])
    assert prompts_sha256([]) != prompts_sha256([""]) and prompt_set_hash([]) == prompt_set_hash([""])
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"prompt": "Summarise:\nthe cat sat"}) + "\n")
    assert load_prompts(path).prompts_sha256 == one.prompts_sha256
    keys = [_verify_key(list(s), ["Hi"], SearchConfig(n_trials=1), RefusalDetector()) for s in (one, two)]
    assert keys[0] != keys[1]  # a cached verification of one set is not reused for the other


def test_sha256_stable_across_loads_and_formats(tmp_path: Path) -> None:
    hashes = set()
    for suffix, writer in WRITERS.items():
        path = tmp_path / f"p{suffix}"
        writer(path, PROMPTS)
        hashes.add(load_prompts(path).sha256)
    assert hashes == {prompt_set_hash(PROMPTS)}
    assert builtin_prompts("harmful", "test").sha256 == load_prompts("builtin:harmful:test").sha256


# --- built-in sets ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "minimum"), [("harmful", 420), ("harmless", 420), ("alarming", 150)])
def test_builtin_sizes_and_categories(kind: str, minimum: int) -> None:
    full = builtin_prompts(kind)
    assert len(full) >= minimum
    assert full.source == f"builtin:{kind}"
    assert full.categories is not None and len(full.categories) == len(full)
    assert len(set(full.prompts)) == len(full), "built-in prompts must be distinct"
    assert len(set(full.categories)) >= 10


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_builtin_splits_are_disjoint_cover_everything_and_are_stratified(kind: str) -> None:
    full = builtin_prompts(kind)
    splits = {split: builtin_prompts(kind, split) for split in ("train", "val", "test")}
    as_sets = {split: set(prompts) for split, prompts in splits.items()}
    assert not as_sets["train"] & as_sets["val"]
    assert not as_sets["train"] & as_sets["test"]
    assert not as_sets["val"] & as_sets["test"]
    assert sum(len(prompts) for prompts in splits.values()) == len(full)
    assert set().union(*as_sets.values()) == set(full)
    assert 0.55 <= len(splits["train"]) / len(full) <= 0.65
    for split in ("val", "test"):
        assert 0.15 <= len(splits[split]) / len(full) <= 0.25
    all_categories = set(full.categories or ())
    for split, prompts in splits.items():
        assert set(prompts.categories or ()) == all_categories, f"{kind}:{split} misses a category"


def test_no_prompt_appears_in_two_builtin_files() -> None:
    owner: dict[str, str] = {}
    for kind in BUILTIN_KINDS:
        for prompt in builtin_prompts(kind):
            key = build.normalize_prompt(prompt)
            assert key not in owner, f"{prompt!r} is in both {owner.get(key)} and {kind}"
            owner[key] = kind


def test_builtin_prompts_are_clean_and_varied() -> None:
    for kind in BUILTIN_KINDS:
        prompts = builtin_prompts(kind)
        assert all(prompt == prompt.strip() and "\n" not in prompt for prompt in prompts)
        openings = Counter(" ".join(prompt.split()[:4]) for prompt in prompts)
        _, most_common_count = openings.most_common(1)[0]
        assert most_common_count <= 12, (
            f"{kind}: too many prompts share one opening: {openings.most_common(3)}"
        )
        lengths = [len(prompt.split()) for prompt in prompts]
        assert min(lengths) <= 6 and max(lengths) >= 40, f"{kind}: needs both short and long prompts"


def test_builtin_source_via_load_prompts_equals_builtin_prompts() -> None:
    assert load_prompts("builtin:harmful:test") == builtin_prompts("harmful", "test")
    assert load_prompts("builtin:harmless") == builtin_prompts("harmless", "all")
    assert load_prompts("builtin:alarming:all") == builtin_prompts("alarming")
    limited = load_prompts("builtin:harmful:train", limit=5)
    assert limited == builtin_prompts("harmful", "train").head(5)


def test_shipped_files_pass_the_build_check() -> None:
    assert build.main(["--check"]) == 0


def test_assign_splits_is_deterministic_and_keeps_existing_splits() -> None:
    rows = [{"prompt": f"prompt {index}", "category": "c"} for index in range(10)]
    rows[0]["split"] = "test"
    first = build.assign_splits(rows)
    assert first == build.assign_splits(list(reversed(rows)))[::-1]
    assert first[0]["split"] == "test"
    assert Counter(row["split"] for row in first) == {"train": 6, "val": 2, "test": 2}


# --- real third-party data ----------------------------------------------------------------------


def test_loads_shared_advbench_file() -> None:
    path = SHARED_DATA / "advbench_harmful.txt"
    if not path.exists():
        pytest.skip(f"{path} not present: ../shared/data is only available on the reference machine")
    prompts = load_prompts(path)
    assert len(prompts) >= 500
    assert prompts.source == str(path)
    assert len(set(prompts)) == len(prompts)


def test_a_txt_prompt_keeps_unicode_line_separators_and_form_feeds(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\u2028still first\nsecond\x0csecond too\r\nthird\n", encoding="utf-8")
    assert list(load_prompts(path)) == ["first\u2028still first", "second\x0csecond too", "third"]


@pytest.mark.parametrize(("source", "takes"), [
    ("p.csv", True), ("p.JSONL", True), ("p.json", True), ("p.parquet", True), ("hf:org/name:train", True), ("p.txt", False),
    ("builtin:harmful:test", False), ("organism-corpus:harmful:4", False),
])
def test_takes_column_names_the_sources_with_columns(source, takes) -> None:
    assert takes_column(source) is takes


def test_a_single_prompt_string_is_one_prompt_not_one_per_character():
    prompts = PromptSet("How do I bake bread?", "typed", "cooking")
    assert prompts.prompts == ("How do I bake bread?",) and prompts.categories == ("cooking",)
