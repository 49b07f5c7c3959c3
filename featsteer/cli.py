"""The `featsteer` command line. Each subcommand parses its arguments, calls the library, and prints.

Every user-facing failure is a `FeatsteerError`: it is printed as one line (`featsteer: error: ...`) and
the command exits with status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from featsteer.errors import FeatsteerError, read_json_file
from featsteer.files import check_empty_folder, staged_output

BIAS_DECAY_DEFAULT = 2.0
"""`--bias-decay`'s default (`edits.BIAS_DECAY`; kept here so the CLI parses without importing torch)."""
GEOMETRY_EVAL_N = 64
"""`directions --eval-n`'s default: `DirectionResult.geometry`'s `repair_prompts` and `reader_prompts` (kept here so the CLI
parses without importing torch)."""


def _load_model(args: argparse.Namespace, spec: str | None = None):
    """The model a command names (`--model`, or `spec`), with the command's `--dtype` and `--device`; its progress bars
    (capture, generation, selection, the optimiser) show on a terminal or with `-v`, and stay out of redirected output
    (a log file, a pipe) without `-v`; `--escape-special` tokenizes special-token text in prompts (system prompt, prefill) as plain text;
    `--harmony-opening` picks the prompt a harmony model's first-token measures read."""
    from featsteer.models import load_model

    model = load_model(args.model if spec is None else spec, dtype=args.dtype, device=args.device,
                       harmony_opening=getattr(args, "harmony_opening", "final"))
    model.show_progress = bool(getattr(args, "verbose", False)) or sys.stderr.isatty()
    model.escape_special_tokens = bool(getattr(args, "escape_special", False))
    return model


def _cmd_info(args: argparse.Namespace) -> int:
    from featsteer.models import RESIDUAL_KINDS

    if args.prompt is not None and not args.prompt.strip():  # an empty --prompt printed nothing, as if not given
        raise FeatsteerError("--prompt is empty: give an instruction to see how the model formats it, or drop --prompt")
    if args.system is not None and args.prompt is None:
        raise FeatsteerError("--system shows --prompt with a system prompt: add --prompt TEXT or drop --system")
    model = _load_model(args)
    print(f"model     {model.name}")
    print(f"family    {model.family}")
    print(f"layers    {model.n_layers}")
    print(f"d_model   {model.d_model}")
    print(f"dtype     {model.dtype}")
    print(f"device    {model.device}")
    layers = f"blocks.{{0..{model.n_layers - 1}}}"
    residual = [kind for kind in RESIDUAL_KINDS if kind in model.layer_kinds]
    embeddings = "hook_embed, hook_pos_embed" if model.learned_positions else "hook_embed"
    print(f"hooks     {embeddings}, {layers}.hook_{{{','.join(residual)}}},")
    norms = f"{layers}.ln1.hook_normalized, {layers}.ln2.hook_normalized, " if model.input_norms else ""
    print(f"          {norms}ln_final.hook_normalized,")
    attention = model.attention_layers
    heads = layers if len(attention) == model.n_layers else f"blocks.{{{','.join(map(str, attention))}}}"
    print(f"          {heads}.attn.hook_z (per head: {model.n_heads} heads)")
    mlp_writers = Counter(writer.layer for writer in model.residual_writers() if writer.kind == "mlp_out")
    if moe := sorted(layer for layer, count in mlp_writers.items() if count > 1):
        print(f"experts   {mlp_writers[moe[-1]]} output projections per mixture-of-experts layer ({len(moe)} of {model.n_layers} "
              "layers; weight edits project every one)")
    if model.moe_layers:
        routed = layers if len(model.moe_layers) == model.n_layers else f"blocks.{{{','.join(map(str, model.moe_layers))}}}"
        print(f"routing   {routed}.mlp.hook_{{router_logits,routing}} (per token: {model.n_experts} experts' logits before the "
              "router's choice, weights after it; `featsteer experts`)")
    notes = [note for flag, note in (
        (model.post_norms, "attention/MLP outputs are normalised before the stream (weight edits are not exactly the ablation hook)"),
        (model.parallel_block, "attention and MLP run in parallel on the block's input (no resid_mid)"),
        (not model.input_norms, "attention and MLP read the stream itself (no ln1/ln2)"),
        (len(attention) < model.n_layers, f"layers {sorted(set(range(model.n_layers)) - set(attention))} mix tokens without attention heads"),
        (model.per_layer_inputs, "each layer adds a per-layer input embedding after its MLP (hook_per_layer_out, a residual write)"),
        (model.scaled_layers, "each layer multiplies the stream by a scalar of its own before it returns (resid_post)"),
    ) if flag]
    for i, note in enumerate(notes):
        print(f"{'notes' if i == 0 else '':<10}{note}")
    if args.prompt:
        print(f"prompt    {model.format_prompts([args.prompt], args.system)[0].text!r}")
        if model.answer_opening():
            print(f"generate  {model.format_prompts([args.prompt], args.system, for_generation=True)[0].text!r}")
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from featsteer.activations import capture

    model = _load_model(args)
    prompts = _load_prompts(args, args.prompts, limit=args.n)
    hooks = _expand_hooks(args.hooks, model)
    stored = capture(model, prompts, hooks, positions=args.positions, batch_size=args.batch_size,
                     max_batch_tokens=_max_batch_tokens(args), system=args.system, chat=not args.raw,
                     stream_to=args.out, shard_rows=args.shard_rows, load_back=False)  # streamed: never all in memory
    print(f"captured {len(stored)} rows x {len(stored.hook_names)} hooks x width {stored.d_model} -> {args.out}")
    return 0


def _max_batch_tokens(args: argparse.Namespace) -> int:
    """`--max-batch-tokens`, or the Python API's default cap when it is not given."""
    from featsteer.models.adapter import DEFAULT_BATCH_TOKENS

    return DEFAULT_BATCH_TOKENS if args.max_batch_tokens is None else args.max_batch_tokens


def _load_prompts(args: argparse.Namespace, source: str, limit: int | None, option: str = "--n", note: bool = True):
    """One of a command's prompt sources, its first `limit` prompts (`option` is the flag that set it; `note=False`
    leaves a shortfall to the caller's note). `--column` goes to
    those that have columns (csv/json/jsonl/parquet files, hf: datasets), not to a .txt file or a built-in or
    organism-corpus set beside them (`_check_column` catches a --column that none takes)."""
    from featsteer.datasets import load_prompts, takes_column

    if limit is not None and limit < 1:  # the loader's own message names its `limit` argument, not the flag
        raise FeatsteerError(f"{option} must be a positive number of prompts (leave it out for all of them), got {limit}")
    prompts = load_prompts(source, column=args.column if takes_column(source) else None, limit=limit)
    if note:
        _note_shortfall(option, limit, {source: len(prompts)})
    return prompts


def _note_shortfall(option: str, asked: int | None, sizes: dict[str, int]) -> None:
    """Print one line when a prompt set holds fewer prompts than `option` asks for: the command goes on with those
    there are, which its figures alone would not say."""
    short = [f"{name} holds {size} prompt{'' if size == 1 else 's'}" for name, size in sizes.items() if asked is not None and size < asked]
    if short:
        print(f"note: {option} {asked}, but {' and '.join(short)}: using those")


def _layer_list(spec: str) -> list[int]:
    """`4,8,12` -> `[4, 8, 12]`, `4-7` -> `[4, 5, 6, 7]`, `0,4-6` -> `[0, 4, 5, 6]`, in the order given, repeats dropped.

    Raises:
        ValueError: for a part that is not a layer number or a FIRST-LAST range with FIRST <= LAST.
    """
    layer_ids: list[int] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not dash:
            layer_ids.append(int(first))
            continue
        start, stop = int(first), int(last)  # int("") fails: a range names both ends, and a layer is never negative
        if start > stop:
            raise ValueError(f"the range {part.strip()} runs backwards")
        layer_ids.extend(range(start, stop + 1))
    return list(dict.fromkeys(layer_ids))


_SELECT_LAYERS_HELP = ("choose the direction among candidates at these layers only, e.g. 4-12 or 4,8,12 (default: every layer; "
                       "the last 20%% are skipped as always): only those are scored, the slow part. Every layer's candidate is "
                       "still computed (one capture) for --scope per_layer, the search and compare's per-layer methods; "
                       "a --search keeps its direction layer within the listed range")


def _layers_option(spec: str | None) -> tuple[int, ...] | None:
    """`--layers SPEC` of `probe`, `directions`, `abliterate` and `compare` as layer numbers (None: every layer).

    Raises:
        FeatsteerError: for a list that does not parse.
    """
    if spec is None:
        return None
    try:
        return tuple(_layer_list(spec))
    except ValueError:
        raise FeatsteerError(f"--layers {spec}: give layer numbers and FIRST-LAST ranges separated by commas, e.g. --layers 4-12 "
                             "or --layers 4,8,12") from None


def _expand_hooks(spec: str, model) -> list[str]:
    """`all` / `resid_pre` / `resid_pre:2,4` / `attn_z:1` / explicit comma-separated hook names."""
    from featsteer.models import HEAD_KINDS, LAYER_KINDS, ROUTING_KINDS

    if spec == "all":  # every layer's residual stream (the other kinds differ in width or meaning: name them)
        return model.hook_names(("resid_pre",))
    kind, colon, layers = spec.partition(":")
    if kind in LAYER_KINDS + HEAD_KINDS + ROUTING_KINDS:
        layer_ids = None
        if colon and not layers.strip():  # 'resid_pre:' read as every layer: a list that was left out, not a request for all
            raise FeatsteerError(f"--hooks {spec} names no layer after the colon: give layer numbers, e.g. {kind}:0,2, "
                                 f"or write {kind} for every layer")
        if layers:
            try:
                layer_ids = _layer_list(layers)
            except ValueError:
                raise FeatsteerError(f"--hooks {spec}: after '{kind}:' give layer numbers separated by commas, e.g. {kind}:0,2 "
                                     f"or {kind}:4-12 (a kind and explicit hook names cannot be mixed)") from None
        names = model.hook_names((kind,), layer_ids)
        if not names:
            raise FeatsteerError(f"--hooks {spec}: {model.name} has no {kind} hook at {'those layers' if layer_ids else 'any layer'}"
                                 + (" (routing hooks exist only at mixture-of-experts layers)" if kind in ROUTING_KINDS else "")
                                 + (f" (heads exist only at its attention layers, {model.attention_layers})" if kind in HEAD_KINDS else ""))
        return names
    return list(dict.fromkeys(h.strip() for h in spec.split(",") if h.strip()))


def _cmd_eval(args: argparse.Namespace) -> int:
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_refusal

    if args.prefill is not None and not args.prefill.strip():
        raise FeatsteerError("--prefill is empty: give the text every harmful response should start with, or 'affirm'")
    harmful = _load_prompts(args, args.harmful, limit=args.n)
    harmless = _load_prompts(args, args.harmless, limit=args.n)
    args.alarming_prompts = _load_prompts(args, args.alarming, limit=args.n) if args.alarming else None  # a bad path fails here, not after generating
    model = _load_model(args)
    reference = _load_reference(args, model, harmless) if args.reference else None  # a bad --reference fails before any generation
    judge = _load_judge(args, model) if args.judge else None  # so does a bad --judge
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              max_batch_tokens=_max_batch_tokens(args), system=args.system, prefill=args.prefill)
    earlier = _read_earlier_eval(args.paired_with, {"harmful": harmful, "harmless": harmless}) if args.paired_with else None
    report = evaluate_refusal(model, harmful, harmless, config, keep_logprobs=True)
    payload = report.to_json()
    payload.update(_logit_metrics(model, report, args, reference))
    if judge is not None:
        from featsteer.evaluation.judge import judge_sets

        payload["judge"] = judge_sets(judge, (report.harmful, report.harmless))
    if earlier is not None:
        from featsteer.evaluation.behaviour import paired_with_earlier

        payload["paired_with"] = {"file": str(args.paired_with), **paired_with_earlier(report, earlier)}
    prefilled = "" if args.prefill is None else (
        ", harmful responses prefilled with each prompt's affirmative opening" if args.prefill == "affirm"
        else f", harmful responses prefilled with {args.prefill!r}")
    print(f"model {model.name}: greedy, max {args.max_new_tokens} new tokens{prefilled}, {report.seconds:.1f}s")
    print(report.table())
    for key in ("kl_harmless", "kl_response_harmless", "reference_nll_harmless", "refusal_score_harmful", "refusal_score_harmless",
                "over_refusal_rate"):
        if payload.get(key) is not None:
            print(f"{key:24} {payload[key]:.4f}")
    for example in report.to_json(2)["examples"]["harmful"][:2]:
        print(f"  e.g. {example['prompt'][:50]!r} -> {example['response'][:70]!r}")
    if judge is not None:
        _print_judge(payload["judge"])
    if earlier is not None:
        paired = payload["paired_with"]
        print(f"paired with {args.paired_with} ({paired['model']}), same prompts: earlier -> now (prompts only earlier / only now, McNemar exact p)")
        for key in ("refused_harmful", "unanswered_harmful", "refused_harmless"):
            row = paired[key]
            print(f"  {key:19} {row['k_a']:4d} -> {row['k_b']:<4d} ({row['only_a']} / {row['only_b']}, p {row['p_value']:.2g})")
    if args.json:
        _write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def _load_judge(args: argparse.Namespace, model):
    """The --judge, loaded (and a chat judge calibrated on the anchors) before any generation. `chat:` plus the
    command's own --model judges with the model already loaded: the judge reads responses only when no edit or hook
    is in place."""
    from featsteer.evaluation.judge import judge_from_spec

    return judge_from_spec(args.judge, dtype=args.dtype, device=args.device, threshold=args.judge_threshold,
                           label=args.judge_label, batch_size=args.batch_size,
                           loaded=model if args.judge == f"chat:{args.model}" else None)


def _print_judge(judged: dict) -> None:
    anchors = judged["anchors"]
    how = "fitted on" if anchors["calibrated"] else "checked on"
    auc = "-" if anchors["auc"] is None else f"{anchors['auc']:.2f}"
    print(f"judge {judged['judge']}: threshold {judged['threshold']:.3f}, {how} {anchors['n']} anchors: accuracy "
          f"{anchors['accuracy']:.2f}, AUC {auc}")
    for name in ("harmful", "harmless"):
        row, agree = judged[name], judged[name]["agreement_with_markers"]
        kappa = "-" if agree["kappa"] is None else f"{agree['kappa']:.2f}"
        print(f"  {name:9} refused {row['k']}/{row['n']} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]; same verdict as the markers "
              f"on {agree['both'] + agree['neither']}/{agree['n']} (kappa {kappa}; markers only {agree['only_a']}, judge only {agree['only_b']})")
    for row in judged["disagreements"][:3]:
        side = "judge" if row["judge"] else "markers"
        print(f"  e.g. refused by the {side} only: {row['prompt'][:40]!r} -> {row['response'][:60]!r}")


def _read_earlier_eval(path: str, prompts: dict) -> dict:
    """An earlier `featsteer eval --json` result for --paired-with, read and checked against this run's prompts before
    any generation runs."""
    from featsteer.evaluation.behaviour import prompts_sha256

    earlier = read_json_file(path, f"--paired-with {path}", "pass the --json output of an earlier featsteer eval")
    per_prompt = earlier.get("per_prompt") if isinstance(earlier, dict) else None
    if not isinstance(per_prompt, dict):
        raise FeatsteerError(f"--paired-with {path} has no per-prompt verdicts: write it with featsteer eval --json (this version)")
    for name, prompt_set in prompts.items():
        verdicts = per_prompt.get(name)
        if not isinstance(verdicts, dict) or verdicts.get("prompts_sha256") != prompts_sha256(list(prompt_set)):
            raise FeatsteerError(f"--paired-with {path} read other {name} prompts (or another order or --n): pair evaluations of the same prompts")
        # checked here, before any generation, rather than found missing when the pairs are counted
        if not all(isinstance(verdicts.get(key), list) and len(verdicts[key]) == len(prompt_set) for key in ("refused", "looping")):
            raise FeatsteerError(f"--paired-with {path} has no refused and looping verdict for each of its {name} prompts: write it "
                                 "with featsteer eval --json (this version)")
    return earlier


def _load_reference(args: argparse.Namespace, model, harmless: Sequence[str]):
    """The --reference model, checked to share `model`'s vocabulary (KL compares distributions over it) and to format
    the `harmless` prompts into the same tokens (KL compares the next token after the same context)."""
    reference = _load_model(args, args.reference)
    if reference.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise FeatsteerError("--reference has a different tokenizer: KL needs the same vocabulary")
    ours, theirs = model.unembed()[0].shape[0], reference.unembed()[0].shape[0]
    if ours != theirs:  # the same tokenizer over output layers padded to different sizes
        raise FeatsteerError(f"--reference scores {theirs} output tokens and the model {ours}: KL needs the same output vocabulary")
    differs = next((i for i, (a, b) in enumerate(zip(_prompt_tokens(model, harmless, args.system),
                                                      _prompt_tokens(reference, harmless, args.system), strict=True)) if a != b), None)
    if differs is not None:  # a base model's fallback template against an instruct model's, or another default system turn
        raise FeatsteerError(f"--reference formats harmless prompt {differs} into other tokens than the model does (another chat "
                             "template or default system prompt): KL compares the next token after the same prompt, so give a "
                             "reference with the model's chat template")
    return reference


def _prompt_tokens(model, prompts: Sequence[str], system: str | None) -> list[list[int]]:
    """Each prompt's token ids as `model` formats it for generation (chat template, system prompt), without padding."""
    batch = model.tokenize(list(prompts), system=system)
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]


def _logit_metrics(model, report, args: argparse.Namespace, reference=None) -> dict:
    """Refusal scores from first-token logits (kept from the generation's prefill); KL against --reference;
    over-refusal on --alarming."""
    from featsteer.evaluation import (
        RefusalDetector,
        RefusalTokens,
        kl_first_token,
        over_refusal_rate,
        refusal_score,
    )
    from featsteer.evaluation.behaviour import evaluate_set, responses_nll
    from featsteer.evaluation.response_kl import response_base, response_kl

    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    harmless = report.harmless.prompts
    harmless_logprobs = report.harmless.first_logprobs
    metrics = {
        "refusal_score_harmful": float(refusal_score(report.harmful.first_logprobs, tokens).mean()),
        "refusal_score_harmless": float(refusal_score(harmless_logprobs, tokens).mean()),
    }
    if reference is not None:
        # one generation of the reference gives its first-token log-probs (from the prefill) and its own answers, along
        # which the same KL is taken with both models teacher-forced
        config = report.config
        own = evaluate_set(reference, harmless, "harmless", config, RefusalDetector(), keep_logprobs=True)
        metrics["kl_harmless"] = kl_first_token(own.first_logprobs, harmless_logprobs)
        along = response_base(reference, list(harmless), list(own.response_tokens), max_tokens=config.max_new_tokens,
                              batch_size=args.batch_size, system=args.system)
        response = response_kl(model, along, batch_size=args.batch_size)
        metrics["kl_response_harmless"] = response.mean
        metrics["kl_response_by_position"] = response.per_position.tolist()
        metrics["reference_nll_harmless"] = responses_nll(reference, report.harmless, report.config)
        metrics["reference"] = reference.name
    if args.alarming:
        rate = over_refusal_rate(model, list(args.alarming_prompts), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 system=args.system, max_batch_tokens=_max_batch_tokens(args))
        metrics["over_refusal_rate"] = rate.rate
        metrics["ci_over_refusal"] = [rate.low, rate.high]
    return metrics


def _default_labels_path(source: str, set_name: str) -> Path:
    """`RUN.labels.json` beside the run (`responses.labels.json` in a compare folder); `RUN.harmless.labels.json` for the
    harmless responses."""
    path = Path(source)
    return path.with_name(f"{path.stem}{'' if set_name == 'harmful' else '.' + set_name}.labels.json")


def _cmd_label(args: argparse.Namespace) -> int:
    from featsteer.evaluation import RefusalDetector
    from featsteer.evaluation import labels as hand

    run = hand.read_responses(args.responses)
    labels = hand.HandLabels.load(args.labels or _default_labels_path(run.source, args.set), args.set)
    detector = RefusalDetector()
    if args.summary:
        methods = [args.method] if args.method else [m for m in run.methods if m in labels.data["labels"]]
        if not methods:
            raise FeatsteerError(f"{labels.path} has no labels of {run.source}'s responses yet: label some first (featsteer label RUN)")
        _print_label_summary(hand, run, labels, methods, detector, args.baseline)
        return 0
    if args.blind and args.lines:
        raise FeatsteerError("--lines adds labels by index for one method: drop --blind and name the method with --method")
    if args.blind:
        methods = [args.method] if args.method else run.methods
    elif args.method is None and len(run.methods) != 1:
        raise FeatsteerError(f"{run.source} holds the responses of {', '.join(run.methods)}: pick one with --method, or label "
                             "them all with --blind")
    else:
        methods = [args.method or run.methods[0]]
    for method in methods:
        if not run.texts(method, args.set):
            raise FeatsteerError(f"{run.source} has no {args.set} responses of {method}: label the other set with --set")
    if args.lines:
        _add_label_lines(hand, run, labels, methods[0], args.lines)
    else:
        items = hand.questions(run, labels, methods, blind=args.blind, seed=args.seed, detector=detector)
        prefills = run.prefills.get(args.set)
        if args.show:
            for item in items:
                print(json.dumps({"index": item.index, **({} if args.blind else {"markers": item.markers}),
                                  "prompt": run.prompts[args.set][item.index], **({"prefill": prefills[item.index]} if prefills else {}),
                                  "response": item.response}))
            return 0
        if not items:
            print(f"every {args.set} response of {', '.join(methods)} is labelled")
        else:
            _ask_labels(hand, run, labels, methods, items, args)
    if shown := [m for m in methods if m in labels.data["labels"]]:
        _print_label_summary(hand, run, labels, shown, detector, args.baseline if args.baseline in shown else None)
    return 0


def _add_label_lines(hand, run, labels, method: str, path: str) -> None:
    lines = Path(path)
    if not lines.is_file():
        raise FeatsteerError(f"--lines {lines}: no such file; write one label per line as 'INDEX r|a[?] REASON'")
    texts = run.texts(method, labels.set_name)
    try:
        parsed = hand.parse_label_lines(lines.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FeatsteerError(f"--lines {lines} is not UTF-8 text: write one label per line as 'INDEX r|a[?] REASON'") from None
    if past := [i for i in parsed if i >= len(texts)]:
        raise FeatsteerError(f"--lines {lines}: index {past[0]} is past the {len(texts)} {labels.set_name} responses of {method} "
                             "(they count from 0)")
    asked = run.asked(labels.set_name)
    for i, label in parsed.items():
        labels.put(method, i, texts[i], label, asked[i])
    labels.save()
    print(f"added {len(parsed)} label{'' if len(parsed) == 1 else 's'} to {labels.path}")


def _ask_labels(hand, run, labels, methods: list[str], items, args: argparse.Namespace) -> None:
    """The interactive session: labels typed on standard input, each saved as it is given."""
    stale = sum(len(labels.stale(m, run.texts(m, args.set), run.asked(args.set))) for m in methods)
    what = (f"{len(items)} responses of {len(methods)} method{'s' if len(methods) > 1 else ''}, blind: shuffled (seed {args.seed}), "
            "with no method name or marker verdict; a text several methods wrote for one prompt is asked once"
            if args.blind else f"{len(items)} of {len(run.texts(methods[0], args.set))} responses of {methods[0]}")
    print(f"{what} to label" + (f" ({stale} relabelled: their response or its prompt changed since)" if stale else "") +
          f". Criterion: {hand.CRITERIA[args.set]}.")
    print("Type r (refuses) or a (answers), with ? if it could go either way, then a reason if you like "
          "('r? turns to home safety'); s skips, q stops.")

    def read() -> str:
        print("label> ", end="", flush=True)
        line = sys.stdin.readline()
        if line and not sys.stdin.isatty():  # piped labels: show them, so the transcript reads as a session
            print(line.rstrip("\n"))
        return line

    hand.ask(labels, run, items, read, print)
    if left := hand.unlabelled(run, labels, methods):
        print(f"{left} still unlabelled: {labels.path} keeps every label given, and the same command goes on from there")


def _print_label_summary(hand, run, labels, methods: list[str], detector, baseline: str | None = None) -> None:
    if baseline is not None:
        run.texts(baseline, labels.set_name)  # an unknown method is a one-line error before anything is printed
    base, pairs = hand.paired_by_hand(run, labels, methods, baseline)
    print(f"{labels.path}: {labels.set_name} responses; {labels.data.get('criterion', hand.CRITERIA[labels.set_name])}")
    print(hand.format_summary(hand.summarize(run, labels, methods, detector)))
    if pairs:
        print(f"\nby hand, paired with {base} on the same prompts (McNemar exact test):")
        print(hand.format_paired(base, pairs))


def _cmd_demo(args: argparse.Namespace) -> int:
    from featsteer.datasets import builtin_prompts
    from featsteer.demo import run_demo

    _note_shortfall("--n", args.n, {f"the built-in {label} test split": len(builtin_prompts(label, "test")) for label in ("harmful", "harmless")})
    result = run_demo(_load_model(args), args.out, n_eval=args.n, max_new_tokens=args.max_new_tokens, full=not args.quick)
    print(f"== refusal behaviour of {result.report.model} (built-in test split)")
    print(result.report.table())
    print("\n== difference-in-means direction per layer (resid_pre, last token; train -> held-out test)")
    print(f"{'hook':28} {'|mean diff|':>11} {'cv acc':>7} {'accuracy':>9} {'AUROC':>7} {'gap (sd)':>9}")
    for row in result.layers:
        s = row.separability
        cv = "-" if row.cv_accuracy is None else f"{row.cv_accuracy:.3f}"
        print(f"{row.hook:28} {row.mean_diff_norm:11.3f} {cv:>7} {s.accuracy:9.3f} {s.auroc:7.3f} {s.gap:9.2f}")
    best = result.best
    cv = "" if best.cv_accuracy is None else f", accuracy {best.cv_accuracy:.3f}"
    print(f"\nbest layer: {best.hook} (chosen by 3-fold CV on the training prompts{cv}; held-out accuracy {best.separability.accuracy:.3f})")
    if result.lens is not None:
        print(f"logit lens of its direction: {result.lens.line()}")
    if result.comparison is not None:
        chosen = result.comparison.setup["chosen"].get("dim", {})
        print(f"\n== every method on the same held-out prompts (DIM direction: {chosen.get('hook')} position {chosen.get('position')})")
        for line in _direction_notes(chosen):
            print(line)
        print(result.comparison.table())
        _print_paired(result.comparison)
        _print_coherence(result.comparison)
    if result.features is not None:
        print("\n== top SAE features (composite score; DIM cosine = decoder row vs the layer's DIM direction)")
        for detail in result.features.features[:5]:
            sc = detail.scores
            print(f"  {detail.hook_name:26} feature {detail.feature_id:5d}  composite {sc['composite']:.3f}  AUROC {sc['auroc']:.3f}  "
                  f"DIM cosine {detail.dim_cosine:+.3f}")
    if result.probes is not None:
        from featsteer.probe_report import PROBE_FOLDS

        row = result.probes.best("linear")
        print(f"\n== probes: best linear-probe layer {row.key} (chosen by {PROBE_FOLDS}-fold CV on the training prompts, accuracy "
              f"{row.cv_accuracy:.3f}; held-out accuracy {row.accuracy:.3f}, selectivity {row.selectivity:.3f}, controls' sd "
              f"{row.control_std:.3f})")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in (result.stage_seconds or {}).items())
    print(f"\noutputs in {result.run_dir}/ (open index.html); {result.seconds:.0f}s in all ({stages})")
    return 0


def _direction_notes(chosen: dict) -> list[str]:
    """How sure the selection is of a compare run's DIM direction, and how much of it is sampling noise, when recorded."""
    lines = []
    if stability := chosen.get("selection_stability"):
        lines.append(f"selection: chosen in {stability['chosen_share']:.0%} of {stability['n_resamples']} bootstrap resamples of the "
                     f"{stability['n_harmful']} + {stability['n_harmless']} validation prompts")
    if size := chosen.get("sample_size"):
        needed = size["needed"].get("0.99")
        lines.append(f"sample size: from {size['n_harmful']} + {size['n_harmless']} training prompts, expected cosine {size['cosine']:.4f} "
                     "with the direction of unlimited such prompts"
                     + ("" if needed is None else f"; 0.99 needs {max(1, math.ceil(needed))} prompts per class"))
    return lines


def _direction_config(args: argparse.Namespace, method: str | None = None):
    from featsteer.pipeline import DirectionConfig

    chosen = method or args.method
    if args.rank is not None and chosen != "svd" and args.command != "compare":
        raise FeatsteerError(f"--rank sets the size of an SVD subspace (--method svd), not of --method {chosen}: drop it")
    layer_ids = _layers_option(getattr(args, "layers", None))
    # directions --layers reads candidates there only; abliterate and compare compute every layer's and score the listed ones
    return DirectionConfig(method=chosen, rank=2 if args.rank is None else args.rank, positions=args.positions, n_select=args.n_select,
                           kl_threshold=args.kl_threshold, batch_size=args.batch_size, filter_train=args.filter_train,
                           screen=args.screen, layers=layer_ids, keep_every_layer=args.command in ("abliterate", "compare"),
                           system=args.system)


def _load_pair(args: argparse.Namespace):

    return (_load_prompts(args, args.harmful, limit=args.n),
            _load_prompts(args, args.harmless, limit=args.n))


def _load_val(args: argparse.Namespace):
    """`(harmful, harmless)` validation prompts from --val-harmful/--val-harmless, or None when neither is given."""

    if (args.val_harmful is None) != (args.val_harmless is None):
        raise FeatsteerError("validation prompts need both sets: give --val-harmful and --val-harmless together")
    if args.val_harmful is None:
        return None
    return tuple(_load_prompts(args, source, limit=args.n) for source in (args.val_harmful, args.val_harmless))


def _note_selection_shortfall(args: argparse.Namespace, result) -> None:
    """The selection scores the first --n-select validation prompts of each set: say so when there are fewer."""
    _note_shortfall("--n-select", args.n_select, {"the harmful validation set": len(result.val[0]),
                                                  "the harmless validation set": len(result.val[1])})


def _cmd_directions(args: argparse.Namespace) -> int:
    from featsteer.pipeline import find_refusal_direction

    if args.optimize < 0:
        raise FeatsteerError(f"--optimize must be a number of steps >= 1 (or 0 for none), got {args.optimize}")
    if args.optimize and args.method in ("svd", "sae"):
        raise FeatsteerError(f"--optimize trains a rank-1 direction: it goes with --method dim|projected|pca|linear|whitened, not {args.method}")
    if args.optimize_option and not args.optimize:
        raise FeatsteerError("--optimize-option sets how --optimize STEPS trains the direction: add --optimize")
    optimize = _optimize_config(args)  # a bad --optimize-option fails before the model loads
    out = Path(args.out)
    check_empty_folder(args.out)  # a second run would leave the first one's gate/, geometry and plots beside its own
    harmful, harmless = _load_pair(args)
    val = _load_val(args)
    held_out = _geometry_prompts(args)
    config = _direction_config(args)  # checks the values before the model loads
    model = _load_model(args)
    result = find_refusal_direction(model, harmful, harmless, config, val=val, keep_activations=True)
    _note_selection_shortfall(args, result)
    if held_out is not None:
        from featsteer.pipeline import warn_reused_held_out

        warn_reused_held_out(held_out, [result.train, result.val], "geometry.md's self-repair and read-side ablation")
    with staged_output(out) as work:  # a later stage failing (geometry, --gate, --optimize) leaves no half-written --out
        _write_directions(args, model, result, config, optimize, out, work, held_out)
    return 0


def _geometry_prompts(args: argparse.Namespace) -> tuple | None:
    """`(harmful, harmless)` from directions' --eval-harmful/--eval-harmless (the first --eval-n of each), which
    geometry.md's self-repair and read-side ablation read instead of the validation prompts; None when neither is
    given. Sets `args.eval_n` to its default (64) when it is not given."""
    if args.eval_n is not None and args.geometry == "off":
        raise FeatsteerError("--eval-n sets how many prompts geometry.md's self-repair and read-side ablation read, and --geometry off "
                             "writes no geometry.md: drop one")
    if args.eval_n is not None and args.eval_n < 1:
        raise FeatsteerError(f"--eval-n must be a positive number of prompts, got {args.eval_n}")
    args.eval_n = GEOMETRY_EVAL_N if args.eval_n is None else args.eval_n
    if (args.eval_harmful is None) != (args.eval_harmless is None):
        raise FeatsteerError("held-out geometry prompts need both sets: give --eval-harmful and --eval-harmless together")
    if args.eval_harmful is None:
        return None
    if args.geometry == "off":
        raise FeatsteerError("--eval-harmful/--eval-harmless are what geometry.md reads, and --geometry off writes none: drop one")
    held = tuple(_load_prompts(args, source, args.eval_n, "--eval-n", note=False) for source in (args.eval_harmful, args.eval_harmless))
    _note_shortfall("--eval-n", args.eval_n, {args.eval_harmful: len(held[0]), args.eval_harmless: len(held[1])})
    return held


def _write_directions(args: argparse.Namespace, model, result, config, optimize, out: Path, work: Path,
                      held_out: tuple | None = None) -> None:
    """`featsteer directions`' files, written into `work` (renamed to `out` when all are written), and its printout;
    geometry.md's self-repair and read-side ablation read `held_out` (harmful, harmless) when given."""
    result.candidates.save(work / "candidates")
    result.chosen.save(work / "chosen")
    stability = result.selection.stability()
    caveats = "".join(f"\nCaveat: {note}.\n" for note in result.selection.caveats())
    (work / "selection.md").write_text(result.selection.table() + f"\n\nSelection stability: {stability.line()}.\n" + caveats)
    harmful_val, harmless_val = result.val
    scored = [s.head(min(args.n_select, len(s))) for s in result.val]  # what select_direction read: the first --n-select of each
    validation = {"val_harmful": harmful_val.source, "val_harmless": harmless_val.source, "n_harmful_val": len(harmful_val),
                  "n_harmless_val": len(harmless_val), "val_harmful_sha256": harmful_val.sha256, "val_harmless_sha256": harmless_val.sha256,
                  "n_select": args.n_select, "n_harmful_scored": len(scored[0]), "n_harmless_scored": len(scored[1]),
                  "scored_harmful_sha256": scored[0].sha256, "scored_harmless_sha256": scored[1].sha256,
                  "layers": None if config.layers is None else sorted(set(config.layers)), "system": config.system}
    _write_json(str(work / "selection.json"), {**result.selection.to_dict(), "stability": stability.to_dict(), "timings": result.timings,
                                              **validation})
    geometry = None
    if result.candidates.rank == 1 and args.geometry != "off":
        geometry = result.geometry(model, reader_layers={"full": True, "estimate": "estimate", "quick": False}[args.geometry],
                                   held_out=held_out, repair_prompts=args.eval_n, reader_prompts=args.eval_n)
    if geometry is not None:
        (work / "geometry.md").write_text(geometry.markdown())
        _write_json(str(work / "geometry.json"), geometry.to_dict())
        geometry.plot(work / "layer_cosines.png")
    print(result.selection.table())
    chosen = result.selection.chosen
    print(f"\nchosen: {chosen.hook} position {chosen.position} (refusal score {result.selection.base_refusal_harmful:.2f} -> "
          f"{chosen.refusal_ablated:.2f} when ablated, KL {chosen.kl_harmless:.4f}); wrote {out}/")
    for note in result.selection.caveats():
        print(f"caveat: {note}")
    print(f"selection stability: {stability.line()} (selection.md)")
    if geometry is not None:
        print(f"logit lens: {geometry.lens.line()}")
    if geometry is not None and geometry.read_on is not None:
        hint = "" if geometry.read_on["prompts"] == "held-out" else "; --eval-harmful/--eval-harmless read held-out ones"
        print(f"self-repair and read-side ablation read {geometry.read_on_text()}{hint}:")
    if geometry is not None and geometry.repair is not None:
        repair, last = geometry.repair, geometry.repair.rows[-1]
        print(f"ablated at {repair.at} only: refusal log-odds {repair.refusal['unedited']:+.2f} -> {repair.refusal['at_hook']:+.2f} "
              f"(every write {repair.refusal['every_write']:+.2f}); repaired after the last layer {last.repaired_text()} (the share of the "
              "removed gap written back; below 0, less is written once it is gone; geometry.md)")
    if geometry is not None and geometry.readers is not None:
        print(geometry.readers.summary() + " (geometry.md)")
    if args.gate:
        from featsteer.interventions import fit_gate, gate_hooks

        gate = fit_gate(model, *result.train, gate_hooks(model, chosen.hook), val=result.val, batch_size=config.batch_size,
                        system=config.system)
        gate.save(work / "gate")
        print(f"gate: {gate.hook}, {_POOLED[gate.pool]}, cosine threshold {gate.threshold:.4f}; "
              f"balanced accuracy {gate.accuracy:.3f} on the {len(harmful_val)} + {len(harmless_val)} validation prompts (gate/; "
              "featsteer steer --gate)")
    chosen_size = next((row for row in (geometry.sample_sizes or []) if row.hook == geometry.hook), None) if geometry is not None else None
    if chosen_size is not None:
        print(f"sample size: the DIM direction at {chosen_size.hook} position {chosen_size.position}, {chosen_size.line()} (geometry.md)")
    if optimize is not None:
        trained = _trained_directions(model, result, optimize)
        trained.save(work / "optimized")
        _print_optimization(trained.provenance["optimization"])
        print(f"wrote the trained direction to {out}/optimized (featsteer steer --directions, featsteer abliterate --directions)")


def _trained_directions(model, result, optimize):
    """The chosen direction trained by `optimize_direction`, as a one-entry `DirectionSet` at the chosen hook and position;
    its provenance keeps the chosen direction's (prompt hashes, selection) and the training record."""
    from featsteer.directions import DirectionSet
    from featsteer.directions.optimize import optimize_direction

    trained = optimize_direction(model, result, optimize)
    chosen = result.chosen
    provenance = {k: v for k, v in chosen.provenance.items() if k not in ("ace", "rotation_axis")}  # those read the start direction
    return DirectionSet(trained.direction[None, None].float(), chosen.hook_names, chosen.positions, f"optimized:{chosen.method}",
                        provenance={**provenance, "optimization": trained.to_dict(), "cosine_with_chosen": round(trained.cosine(), 4)})


def _cmd_abliterate(args: argparse.Namespace) -> int:
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_refusal
    from featsteer.pipeline import abliterate, direction_record, find_refusal_direction, split

    check_empty_folder(args.out)
    mode = "induce" if args.induce else "amplify" if args.reverse else "norm_preserving" if args.norm_preserving else "orthogonalize"
    if args.induce_bias or args.induce_template:
        _check_addition_options(args)
        mode = "bias_addition" if args.induce_bias else "token_addition"
    for flag, given, applies, modes in (("--alpha", args.alpha, mode in ("amplify", "induce"), "--reverse or --induce"),
                                        ("--shift", args.shift, mode == "induce", "--induce"),
                                        ("--scale", args.scale, mode in ADDITIONS, "--induce-bias or --induce-template"),
                                        ("--bias-decay", args.bias_decay, mode == "bias_addition", "--induce-bias")):
        if given is not None and not applies:  # it would be ignored (and --alpha, --shift recorded in featsteer.json as if applied)
            raise FeatsteerError(f"{flag} applies to {modes}: without it, drop {flag}")
    for flag, given in (("--alpha", args.alpha), ("--shift", args.shift)):
        if given is not None and not math.isfinite(given):  # checked before the model loads and a direction is chosen
            raise FeatsteerError(f"{flag} {given}: give a finite number")
    args.alpha = 1.0 if args.alpha is None else args.alpha
    args.shift = 0.0 if args.shift is None else args.shift
    args.scale = 1.0 if args.scale is None else args.scale
    args.bias_decay = BIAS_DECAY_DEFAULT if args.bias_decay is None else args.bias_decay
    GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)  # bad values fail before anything slow runs
    if args.search < 0:
        raise FeatsteerError(f"--search must be a number of trials >= 1 (or 0 for none), got {args.search}")
    if args.reflect and (mode != "orthogonalize" or args.search):
        raise FeatsteerError("--reflect is its own edit (every write's component of the direction reversed): drop --reverse/--induce/"
                             "--norm-preserving/--search")
    warm_start: list[dict] = []
    if args.search:  # option clashes are reported before anything slow runs
        from featsteer.search import load_warm_start, search_abliteration

        if mode not in ("orthogonalize", "norm_preserving"):
            raise FeatsteerError("--search tunes abliteration only: drop --reverse/--induce")
        if args.scope != "global":
            raise FeatsteerError("--search chooses the direction scope itself: drop --scope")
        if args.heads:
            raise FeatsteerError("--search tunes every writer's strength: drop --heads")
        search_dir = Path(args.search_dir or f"{args.out.rstrip('/')}-search")
        if search_dir.resolve() == Path(args.out).resolve():
            raise FeatsteerError("--search-dir and --out name the same folder: the search's files would leave the export folder not empty")
        _check_search_folder(search_dir)
        if args.search_warm_start:
            warm_start = load_warm_start(args.search_warm_start)
    elif args.search_warm_start:
        raise FeatsteerError("--search-warm-start seeds a search: add --search N")
    elif args.search_trial is not None:
        raise FeatsteerError("--search-trial picks a trial of a search: add --search N (with --search-dir of the finished search)")
    if args.heads and (args.directions or args.method == "sae" or args.scope != "global"):
        raise FeatsteerError("--heads edits single heads against the direction fitted here: it goes with a direction --method, "
                             "--scope global and no --directions")
    heads_spec = _heads_spec(args.heads) if args.heads else None  # a malformed --heads fails before the model loads
    if args.passes < 1:
        raise FeatsteerError(f"--passes must be at least 1, got {args.passes}")
    if args.passes > 1 and (mode not in ("orthogonalize", "norm_preserving") or args.reflect):
        raise FeatsteerError("--passes takes each next direction with the earlier ones removed, which --reverse/--induce (they amplify them) "
                             "and --reflect (it flips them) do not do: drop --passes, or the edit option")
    if args.passes > 1 and (args.search or args.heads or args.directions or args.method in ("sae", "svd") or args.scope != "global"):
        raise FeatsteerError("--passes refines a rank-1 direction fitted here into a global edit: it goes with --method "
                             "dim|projected|pca|linear|whitened, --scope global, and no --search, --heads or --directions")
    if args.optimize < 0:
        raise FeatsteerError(f"--optimize must be a number of steps >= 1 (or 0 for none), got {args.optimize}")
    if args.optimize and (args.search or args.heads or args.directions or args.method in ("sae", "svd") or args.scope != "global"
                          or args.passes > 1):
        raise FeatsteerError("--optimize trains a rank-1 direction fitted here for a global edit: it goes with --method "
                             "dim|projected|pca|linear|whitened, --scope global, and no --search, --heads, --passes or --directions")
    if args.optimize and mode in ("amplify", "induce"):
        raise FeatsteerError("--optimize trains a direction to be removed, which --reverse/--induce would amplify instead: drop "
                             "--optimize, or the edit option")
    if args.optimize_option and not args.optimize:
        raise FeatsteerError("--optimize-option sets how --optimize STEPS trains the direction: add --optimize")
    optimize = _optimize_config(args)  # a bad --optimize-option fails before the model loads
    args.held_out = _load_held_out(args)  # a missing or empty --eval-* file fails before the model loads
    if args.layers is not None and (args.directions or args.method == "sae"):
        raise FeatsteerError("--layers limits the layers a direction is chosen among; "
                             + ("--directions DIR brings its direction" if args.directions else "--method sae picks SAE features")
                             + ": drop --layers")
    if args.directions:
        return _abliterate_saved(args, mode, warm_start)
    if args.direction_hook is not None or args.direction_position is not None or args.direction_index is not None:
        raise FeatsteerError("--direction-hook, --direction-position and --direction-index pick a direction from --directions DIR: add it")
    if args.method == "sae":
        return _abliterate_sae(args, mode, warm_start)
    if args.sae or args.sae_top_k is not None:
        raise FeatsteerError("--sae and --sae-top-k go with --method sae")
    harmful, harmless = _load_pair(args)
    val = _load_val(args)
    config = _direction_config(args)  # checks the values before the model loads
    pick_prompts = _scale_pick_prompts(args, (val or (None, split(harmless, config.val_fraction)[1]))[1]) if mode in ADDITIONS and args.scale == "auto" else ()
    model = _load_model(args)
    if isinstance(heads_spec, dict):
        model.head_ids(heads_spec)  # heads the model does not have fail now, not after the direction search
    result = find_refusal_direction(model, harmful, harmless, config, val=val)
    _note_selection_shortfall(args, result)
    chosen = result.selection.chosen
    print(f"direction: {args.method} at {chosen.hook} position {chosen.position} (KL on harmless {chosen.kl_harmless:.4f})")
    for note in result.selection.caveats():
        print(f"caveat: {note}")
    edit = _edit_config(args, mode, model) if mode not in ADDITIONS else None
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system)
    (held_harmful, held_harmless), checked_on = _check_prompts(args, result.val, result.train)
    before = evaluate_refusal(model, held_harmful, held_harmless, config)
    extra = {}
    if mode in ADDITIONS:
        handle = _addition(args, mode, model, result.chosen_basis[0], result.mean_difference_length(model), chosen.hook,
                           {"method": args.method, "direction_hook": chosen.hook, "direction_position": chosen.position}, pick_prompts,
                             _template_prompts(args, result.val))
    elif args.search:
        search_dir = Path(args.search_dir or f"{args.out.rstrip('/')}-search")
        found = _chosen_trial(args, search_abliteration(model, result, search_dir, _search_config(args, mode), warm_start=warm_start))
        extra = {"search": {"dir": str(search_dir), "best": found.best}}
        _print_search(args, found, search_dir)
        handle = found.apply(model, result, record={**direction_record(result), "search": found.best})
    elif heads_spec is not None:
        from featsteer.pipeline import heads_of

        if isinstance(heads_spec, int):
            ranked = result.writing_heads(model)
            if not ranked:
                raise FeatsteerError("no attention head writes the chosen direction more on the harmful training prompts: give --heads L:H,...")
            heads_spec = heads_of(ranked[:heads_spec])
        handle = abliterate(model, result, edit, heads=heads_spec)
        print("heads: " + "; ".join(f"layer {layer}: {ids}" for layer, ids in handle.record["heads"].items()))
    else:
        handle = abliterate(model, result, edit, scope=args.scope, passes=args.passes, optimize=optimize)
        if "optimization" in handle.record:
            _print_optimization(handle.record["optimization"])
        if "iteration" in handle.record:
            gaps = handle.record["iteration"]["gaps"]
            print(f"iterative refinement: {handle.record['iteration']['passes']} directions; mean difference at {chosen.hook} "
                  + " -> ".join(f"{g:.3g}" for g in gaps) + " (each after the directions before it are edited out)")
    return _check_and_export(model, handle, (held_harmful, held_harmless), before, config, "reflect" if args.reflect else mode, args.out, checked_on, extra)


ADDITIONS = ("bias_addition", "token_addition")
"""The abliterate modes that add the mean difference (`--induce-bias`, `--induce-template`) instead of editing writers."""


def _check_addition_options(args: argparse.Namespace) -> None:
    """`--induce-bias` and `--induce-template` add one direction: the options of the other edits are errors before anything loads."""
    flag = "--induce-bias" if args.induce_bias else "--induce-template"
    clashes = [flag for flag, given in (("--induce-template", args.induce_bias and args.induce_template), ("--reverse", args.reverse), ("--induce", args.induce), ("--norm-preserving", args.norm_preserving),
                                        ("--reflect", args.reflect), ("--search", args.search), ("--heads", args.heads),
                                        ("--passes", args.passes > 1), ("--optimize", args.optimize), ("--scope", args.scope != "global"),
                                        (f"--method {args.method}", args.method in ("sae", "svd"))) if given]
    if clashes:
        how = "through biases" if args.induce_bias else "at the chat template's own tokens"
        raise FeatsteerError(f"{flag} adds the chosen rank-1 direction {how}: drop {', '.join(clashes)}")
    if args.induce_template and args.bias_decay is not None:
        raise FeatsteerError("--bias-decay spreads --induce-bias over biases; --induce-template writes embedding rows: drop it")
    if args.scale not in (None, "auto") and not math.isfinite(args.scale):
        raise FeatsteerError(f"--scale must be a finite number or auto, got {args.scale}")
    if args.bias_decay is not None and not (math.isfinite(args.bias_decay) and args.bias_decay >= 1):
        raise FeatsteerError(f"--bias-decay must be a finite number >= 1, got {args.bias_decay}")


def _scale_or_auto(text: str) -> float | str:
    """`--scale`: a number, or `auto` (picked on validation prompts)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor auto") from None


def _scale_pick_prompts(args: argparse.Namespace, val_harmless) -> list[str]:
    """The validation harmless prompts `--scale auto` picks on: those after the first `--eval-n`, which the before/after
    check reads unless it has held-out sets of its own, up to `--n-select` of them; none left is an error (before the
    model loads)."""
    start = 0 if getattr(args, "held_out", None) is not None else args.eval_n
    spare = list(val_harmless)[start: start + args.n_select]
    if not spare:
        raise FeatsteerError(f"--scale auto picks the scale on validation harmless prompts the before/after check does not read, and "
                             f"the {len(val_harmless)} validation harmless prompts are all among the --eval-n {args.eval_n} it reads: "
                             "give more (--val-harmless, or a larger --n) or lower --eval-n")
    return spare


def _addition(args: argparse.Namespace, mode: str, model, direction, length: float, hook: str, record: dict, pick_prompts: Sequence[str],
              prompts: Sequence[str]):
    """`--induce-bias` / `--induce-template`: `--scale` times the mean difference along `direction` (found at `hook`) added
    through the model's biases before `hook`, or to the embedding rows of the chat template's own tokens (found on
    `prompts`); with `--scale auto`, the scale `pick_induce_scale` picks on `pick_prompts`. Prints where it went."""
    from featsteer.edits import add_at_tokens, add_through_biases, template_tokens

    unit = direction.double().flatten() / direction.double().norm() * length
    tokens = template_tokens(model, list(prompts), system=args.system) if mode == "token_addition" else []

    def add(scale: float, extra: dict | None = None):
        full = {**record, "scale": scale, "length": length, **(extra or {})}
        if mode == "token_addition":
            return add_at_tokens(model, scale * unit, tokens, record=full)
        return add_through_biases(model, scale * unit, hook, decay=args.bias_decay, record=full)

    scale, picked = args.scale, None
    if scale == "auto":
        from featsteer.compare import pick_induce_scale

        scale, rates = pick_induce_scale(model, add, pick_prompts, batch_size=args.batch_size, system=args.system)
        picked = {"prompts": len(pick_prompts), "coherent_refusal": {f"{k:g}": v for k, v in rates.items()}}
        print(f"scale picked on {len(pick_prompts)} validation harmless prompts the check does not read (coherent refusal): "
              + ", ".join(f"{k:g}x {v:.2f}" for k, v in rates.items()) + f" -> {scale:g}")
    handle = add(scale, {"scale_pick": picked} if picked else None)
    if mode == "token_addition":
        names = ", ".join(handle.record["edit"]["tokens"].values())
        print(f"token addition: {scale:g} x the mean difference (length {length:.3g}) found at {hook}, added to the embedding row of {names}")
        return handle
    biases = list(handle.bias_originals)
    where = (f"the bias of {biases[0].removesuffix('.b_V')}" if len(biases) == 1
             else f"{len(biases)} biases, {biases[0]} to {biases[-1]} (decay {args.bias_decay:g})")
    same = "; the same as the runtime addition" if handle.record["edit"]["exact_at_hook"] else ""
    print(f"bias addition: {scale:g} x the mean difference (length {length:.3g}) at {hook} through {where}{same}")
    return handle


def _optimize_config(args: argparse.Namespace):
    """`--optimize STEPS` with its `--optimize-option`s as an `OptimizeConfig`, or None without it."""
    from featsteer.directions.optimize import OptimizeConfig

    return OptimizeConfig(steps=args.optimize).with_options(args.optimize_option or [], "--optimize-option") if args.optimize else None


_ABLATION_TARGET_WORDS = {"ablated": "answers", "affirm": "affirmative openings"}
"""How `_print_optimization` names the ablation loss's targets, per `OptimizeConfig.ablation_targets`."""


def _print_optimization(record: dict) -> None:
    """Two lines on a trained direction: how far it moved and what its losses did (first and last step)."""
    history, steps = record["history"], record["config"]["steps"]
    targets = record["targets"]
    print(f"optimised direction: {steps} steps from the chosen one (cosine {record['cosine_with_start'][str(steps)]:.3f} with it); "
          f"targets: {targets['ablation']} of {targets['harmful_read']} harmful {_ABLATION_TARGET_WORDS[record['config'].get('ablation_targets', 'ablated')]}, "
          f"{targets['addition']} addition refusals, "
          f"{targets['retain']} harmless answers" + (f", {targets['refusal']} harmful prompts for the refusal loss" if targets.get("refusal") else ""))
    names = [n for n in history[0] if n not in ("total", "cosine")]  # the losses that ran, in training order
    print("losses, first -> last step: " + ", ".join(f"{n} {history[0][n]:.3f} -> {history[-1][n]:.3f}" for n in names))


def _heads_spec(spec: str) -> int | dict[int, list[int]]:
    """`--heads`: `top:N` as N (the N heads that write the chosen direction most more on harmful training prompts, ranked
    once the direction is fitted) or an explicit `L:H,H;L:H` list."""
    if spec.startswith("top:"):
        count = spec.removeprefix("top:")
        if not count.isdigit() or int(count) < 1:
            raise FeatsteerError(f"--heads '{spec}' is not top:N with N >= 1, e.g. top:8")
        return int(count)
    return _layer_ids(spec, option="--heads", example="3:0,5;7:2")


def _edit_config(args: argparse.Namespace, mode: str, model):
    """The weight edit the abliterate options ask for."""
    from featsteer.edits import EditConfig

    if args.reflect:
        return EditConfig.reflection(model.n_layers)
    return EditConfig(mode=mode, alpha=args.alpha, shift=args.shift)


def _search_config(args: argparse.Namespace, mode: str):
    from featsteer.search import SearchConfig

    return SearchConfig(n_trials=args.search, mode=mode, max_new_tokens=args.max_new_tokens, kl_prompts=args.search_kl, system=args.system)


def _chosen_trial(args: argparse.Namespace, found):
    """The search result with `--search-trial N` as its chosen point, when given."""
    return found if args.search_trial is None else found.choose(args.search_trial)


def _check_search_folder(folder: Path) -> None:
    """A search folder is new, empty, or an earlier search's (it holds search.db): never another tool's output."""
    if folder.exists() and not folder.is_dir():
        raise FeatsteerError(f"--search-dir {folder} is an existing file: give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "search.db").is_file():
        raise FeatsteerError(f"--search-dir {folder} holds other files and no search.db: give a new folder, or an earlier search's to resume it")


def _print_search(args: argparse.Namespace, found, search_dir: Path) -> None:
    best = found.best or {}
    verified = best.get("verified") or {}
    print(f"search: {len(found.trials)} trials, {len(found.pareto)} on the Pareto front; Pareto front and plot in {search_dir}/")
    how = " (--search-trial)" if args.search_trial is not None else ""
    if verified:
        from featsteer.search import verified_kl

        kl = f"KL {verified.get('kl', best['kl']):.4f}"
        if args.search_kl != "all":  # the KL the choice was bounded by, next to the all-prompt one
            over = {"answered": "answered KL (harmless prompts with no refusal marker in the unedited model's response)",
                    "response": "response KL"}[args.search_kl]
            kl += f", {over} {verified_kl(best, args.search_kl):.4f} (the bound's)"
        print(f"  chosen{how}: trial {best['number']}, validation refusal {verified['refusal_rate']:.3f}, {kl}; params {best.get('params')}")
    elif best:
        over = {"all": "", "answered": " (harmless prompts answered by the first token, refusal log-odds <= 0)",
                "response": " (along the unedited model's answers)"}[args.search_kl]
        print(f"  chosen{how}: trial {best['number']} (not verified by generation), proxy refusal {best['refusal_rate_proxy']:.3f}, "
              f"proxy KL{over} {best['kl']:.4f}; params {best.get('params')}")


def _fixed_search_edit(args: argparse.Namespace, model, basis, val, mode: str, warm_start: list[dict], provenance: dict, record: dict):
    """`--search N` for a fixed basis (SAE rows or a saved direction): search its kernels, apply the chosen point.
    Returns the edit handle and the `search` entry for `featsteer.json`."""
    from featsteer.search import search_fixed_abliteration

    search_dir = Path(args.search_dir or f"{args.out.rstrip('/')}-search")
    found = search_fixed_abliteration(model, basis, val, search_dir, _search_config(args, mode), warm_start=warm_start, provenance=provenance)
    found = _chosen_trial(args, found)
    _print_search(args, found, search_dir)
    return found.apply(model, record={**record, "search": found.best}), {"search": {"dir": str(search_dir), "best": found.best}}


def _load_held_out(args: argparse.Namespace) -> tuple | None:
    """`(harmful, harmless)` from abliterate's --eval-harmful/--eval-harmless (first --eval-n of each), or None."""

    if (args.eval_harmful is None) != (args.eval_harmless is None):
        raise FeatsteerError("the held-out check needs both sets: give --eval-harmful and --eval-harmless together")
    if args.eval_harmful is None:
        return None
    held = tuple(_load_prompts(args, source, args.eval_n, "--eval-n", note=False) for source in (args.eval_harmful, args.eval_harmless))
    _note_shortfall("--eval-n", args.eval_n, {args.eval_harmful: len(held[0]), args.eval_harmless: len(held[1])})
    return held


def _check_prompts(args: argparse.Namespace, validation: tuple, training: tuple | None = None) -> tuple[tuple, str]:
    """The `(harmful, harmless)` prompts abliterate's before/after check reads, and what they are: the --eval-* sets
    (`held-out`), or else the first --eval-n validation prompts (`validation`), which the selection and a --search
    picked on, so their after-rate is not a held-out figure. Held-out prompts that are also `training` or validation
    prompts are named in a warning."""
    if args.held_out is not None:
        from featsteer.pipeline import warn_reused_held_out

        warn_reused_held_out(args.held_out, [pair for pair in (training, validation) if pair is not None], "the before/after check")
        return args.held_out, "held-out"
    _note_shortfall("--eval-n", args.eval_n, {"the harmful validation set": len(validation[0]), "the harmless validation set": len(validation[1])})
    return tuple(s.head(min(args.eval_n, len(s))) for s in validation), "validation"


def _template_prompts(args: argparse.Namespace, validation: tuple) -> Sequence[str]:
    """Harmless prompts `--induce-template` finds the chat template's own tokens on: the validation ones the check
    reads when it reads validation prompts (as before), never the held-out ones."""
    return validation[1].head(min(args.eval_n, len(validation[1])))


def _check_and_export(model, handle, held: tuple, before, config, mode: str, out: str, prompts: str, extra: dict) -> int:
    """Refusal on the `held` (harmful, harmless) prompts with the edit applied, printed against `before` (the same
    prompts unedited); then export the edited model. `prompts` says what they are (`held-out` or `validation`), and
    `featsteer.json` records it with their hashes."""
    from featsteer.evaluation.behaviour import evaluate_refusal

    after = evaluate_refusal(model, *held, config)
    note = "" if prompts == "held-out" else " (the selection's own; --eval-harmful/--eval-harmless for held-out)"
    print(f"refusal on {prompts} prompts{note}, before -> after ({mode}):")
    print(_rate_line("harmful", before.harmful, after.harmful))
    print(_rate_line("harmless", before.harmless, after.harmless))
    checked = {"prompts": prompts, "sha256": {"harmful": held[0].sha256, "harmless": held[1].sha256}, "system": config.system}
    handle.export(out, extra={"evaluation": {**checked, "before": before.to_json(0), "after": after.to_json(2)}, **extra})
    print(f"wrote {out} (loads with `featsteer eval --model {out}` or transformers)")
    return 0


def _rate_line(name: str, before, after) -> str:
    """One set's refusal rate before -> after an edit, and how many responses end in a loop when any do: a looping
    response is neither an answer nor a refusal, and an edit that makes a model loop has damaged it whatever the rate
    says (`--reverse`/`--induce` at a high `--alpha` or `--shift` do)."""
    line = f"  {name:<9} {before.rate} -> {after.rate}"
    looped = before.looping_rate, after.looping_rate
    if looped[0].k or looped[1].k:
        line += f"; looping {looped[0].k}/{looped[0].n} -> {looped[1].k}/{looped[1].n}"
    return line


_PICK_KL_LABELS = {"kl_harmless": "first-token KL", "kl_response_harmless": "response KL"}
"""The validation KL a pick weighed (`compare._pick_kl_key`: `pick_kl="first"` or `"response"`) and how a line names it."""


def _sae_validation_lines(details: dict) -> list[str]:
    """`abliterate --method sae`'s validation row per k, as measured and recorded (`compare._validation_table`), with the
    KL the pick weighed, named. A k the coherence bound ruled out entered the pick as unanswered 1.0
    (`compare._validation_rows`); its line gives what it measured and says why it cannot win. An induce clamp's row
    (`compare._pick_induce`: `refusal_harmless`, `clamp_norm`) gives its validation harmless refusal and clamp strength."""
    ruled_out, nlls = details.get("incoherent") or [], details.get("validation_base_nll") or {}
    lines = []
    for setting, row in details.get("sae_validation", {}).items():
        if "unanswered_harmful" not in row:  # an induce clamp, picked on how much harmless refusal it brings
            lines.append(f"  {setting:>6}: validation harmless refused {row['refusal_harmless']:.3f}, clamp write norm {row['clamp_norm']:.2f}")
            continue
        kl = "".join(f", {label} {row[key]:.4f}" for key, label in _PICK_KL_LABELS.items() if key in row)
        line = f"  {setting:>6}: validation unanswered {row['unanswered_harmful']:.3f}{kl}"
        if setting in ruled_out:
            line += (f"; ruled out: its validation harmless answers cost {nlls[setting]:.2f} nats per token, above the coherence "
                     f"bound ({nlls['unedited']:.2f} for the model's own + {details['max_nll_rise']:g})")
        lines.append(line)
    return lines


def _abliterate_sae(args: argparse.Namespace, mode: str, warm_start: list[dict]) -> int:
    """`abliterate --method sae`: project the top SAE features' decoder rows (k as `featsteer compare` picks it)
    out of every residual writer, or with `--search N` out of each writer at the searched strengths; check it on the
    validation prompts and export the model."""
    from featsteer.compare import CompareContext, SaeMethodConfig, sae_topk_basis
    from featsteer.edits import apply_edit
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_refusal
    from featsteer.sae import load_sae_source

    if not args.sae:
        raise FeatsteerError("--method sae needs SAEs: add --sae organism|DIR")
    if mode not in ("orthogonalize", "norm_preserving") or args.scope != "global" or args.filter_train or args.screen is not None:
        raise FeatsteerError("--method sae projects decoder rows out (optionally --norm-preserving): "
                             "drop --reverse/--induce/--scope/--filter-train/--screen")
    sae_config = SaeMethodConfig(top_k=args.sae_top_k)  # checks the value before anything slow runs
    harmful, harmless = _load_pair(args)
    val = _load_val(args)
    model = _load_model(args)
    config = _direction_config(args, method="dim")  # how prompts are split, read and batched; no direction is fitted
    ctx = CompareContext(model, harmful, harmless, config, saes=load_sae_source(args.sae, model), sae_config=sae_config, val=val,
                         system=args.system)
    basis = sae_topk_basis(ctx)
    details = ctx.details()
    picked = " (picked on validation)" if "sae_validation" in details else ""
    print(f"direction: SAE decoder rows of features {details['sae_features']} at {details['sae_hook']}{picked}")
    for line in _sae_validation_lines(details):
        print(line)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system)
    (held_harmful, held_harmless), checked_on = _check_prompts(args, ctx.validation_sets(), ctx.training())
    before = evaluate_refusal(model, held_harmful, held_harmless, generation)
    record = {"method": "sae", "sae_source": args.sae, **details, "prompt_sha256": {"harmful": harmful.sha256, "harmless": harmless.sha256}}
    if args.search:
        provenance = {"method": "sae", "sae_source": args.sae, "sae_hook": details["sae_hook"], "sae_features": details["sae_features"]}
        handle, extra = _fixed_search_edit(args, model, basis, ctx.validation_sets(), mode, warm_start, provenance, record)
    else:
        handle, extra = apply_edit(model, basis, _edit_config(args, mode, model), record=record), {}
    return _check_and_export(model, handle, (held_harmful, held_harmless), before, generation, "reflect" if args.reflect else mode, args.out, checked_on, extra)


def _saved_direction(args: argparse.Namespace):
    """`(basis, record)` of the direction `--directions DIR [--direction-hook H] [--direction-position P]` names."""
    from featsteer.directions import DirectionSet

    if not Path(args.directions).is_dir():
        raise FeatsteerError(f"--directions {args.directions} is not a folder: pass a DirectionSet folder such as DIRS/chosen from `featsteer directions`")
    directions = DirectionSet.load(args.directions)
    _check_direction_index(args, directions)
    matches = [i for i, (hook, pos) in enumerate(zip(directions.hook_names, directions.positions, strict=True))
               if (args.direction_hook is None or hook == args.direction_hook) and (args.direction_position is None or pos == args.direction_position)
               and args.direction_index in (None, i)]
    if not matches:
        raise FeatsteerError(f"{args.directions} has no direction at {args.direction_hook or 'any hook'} position "
                             f"{'any' if args.direction_position is None else args.direction_position}"
                             f"{'' if args.direction_index is None else f' with entry number {args.direction_index}'}: "
                             f"it has hooks {sorted(set(directions.hook_names))} at positions {sorted(set(directions.positions))}")
    if len(matches) > 1 and len({(directions.hook_names[i], directions.positions[i]) for i in matches}) == 1:  # two SAE features at one hook
        raise FeatsteerError(f"{args.directions} holds {len(matches)} directions at {directions.hook_names[matches[0]]} position "
                             f"{directions.positions[matches[0]]} ({_entries_listed(directions, matches)}): choose one by entry number "
                             "with --direction-index I")
    if len(matches) > 1:
        raise FeatsteerError(f"{args.directions} holds {len(matches)} matching directions: choose one with --direction-hook "
                             f"(of {sorted(set(directions.hook_names))}) and --direction-position (of {sorted(set(directions.positions))}), "
                             "or by entry number with --direction-index I")
    index = matches[0]
    record = {"method": "saved", "directions": str(args.directions), "direction_method": directions.method,
              "direction_hook": directions.hook_names[index], "direction_position": directions.positions[index], "direction_index": index,
              "direction_provenance": dict(directions.provenance)}
    if "mean_diff_norm" in directions.scores:
        record["direction_length"] = float(directions.scores["mean_diff_norm"][index])
    else:
        record["direction_length"] = None
    if "ridge_weights" in directions.scores:  # an SVD subspace: the plain edit damps each row as the selection scored it
        record["ridge_weights"] = [float(w) for w in directions.scores["ridge_weights"][index]]
    return directions.bases[index], record


def _abliterate_saved(args: argparse.Namespace, mode: str, warm_start: list[dict]) -> int:
    """`abliterate --directions DIR`: edit against a saved direction (nothing is fitted), or with `--search N` search the
    kernels and strengths of removing it; check on the validation prompts and export."""
    from featsteer.directions.methods import ridge_weighted
    from featsteer.edits import apply_edit
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_refusal
    from featsteer.pipeline import DirectionConfig, split
    from featsteer.search import fixed_basis

    if (args.method != "dim" or args.sae or args.sae_top_k is not None or args.scope != "global" or args.filter_train
            or args.screen is not None):
        raise FeatsteerError("--directions brings its own direction: drop --method/--sae/--sae-top-k/--scope/--filter-train/--screen")
    direction, record = _saved_direction(args)
    if mode in ADDITIONS and record["direction_length"] is None:
        raise FeatsteerError(f"--induce-bias and --induce-template add --scale times the mean difference, and {args.directions} stores no mean_diff_norm score: "
                             "use the set the direction was chosen in (DIRS/chosen from featsteer directions)")
    val = _load_val(args)
    if val is None:
        harmful, harmless = _load_pair(args)
        fraction = DirectionConfig().val_fraction
        val = (split(harmful, fraction)[1], split(harmless, fraction)[1])
    pick_prompts = _scale_pick_prompts(args, val[1]) if mode in ADDITIONS and args.scale == "auto" else ()
    model = _load_model(args)
    basis = fixed_basis(direction, model.d_model)  # a width that does not fit the model is reported before anything runs
    print(f"direction: {record['direction_method']} from {args.directions} at {record['direction_hook']} position "
          f"{record['direction_position']}, entry {record['direction_index']} (rank {basis.shape[0]})")
    found_with = record["direction_provenance"].get("system")
    if found_with != args.system:  # a legitimate experiment, but not one to run unawares: featsteer.json records both
        print(f"note: the direction was found with {'the system prompt ' + repr(found_with) if found_with else 'no system prompt'}; "
              f"this run formats its prompts with {'the system prompt ' + repr(args.system) if args.system else 'none'}")
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system)
    held, checked_on = _check_prompts(args, val)
    before = evaluate_refusal(model, *held, generation)
    if mode in ADDITIONS:
        handle, extra = _addition(args, mode, model, basis[0], record["direction_length"], record["direction_hook"], record, pick_prompts,
                                  _template_prompts(args, val)), {}
    elif args.search:
        provenance = {k: record[k] for k in ("method", "directions", "direction_method", "direction_hook", "direction_position",
                                                  "direction_index")}
        handle, extra = _fixed_search_edit(args, model, basis, val, mode, warm_start, provenance, record)
    else:
        weights = record.get("ridge_weights")  # the SVD method's damped projector, as `featsteer abliterate --method svd` applies it
        handle, extra = apply_edit(model, ridge_weighted(basis, weights), _edit_config(args, mode, model), record=record,
                                   weighted=weights is not None), {}
    return _check_and_export(model, handle, held, before, generation, "reflect" if args.reflect else mode, args.out, checked_on, extra)


DIRECTION_STEER_MODES = ("ablate", "add", "set", "conditional", "ace", "angular")
"""`featsteer steer` modes for a saved direction."""
FEATURE_STEER_MODES = ("clamp", "scale", "ablate", "add")
EXPERT_STEER_MODES = ("deactivate", "activate")
"""`featsteer steer --experts` modes (`interventions.ExpertSteer`)."""
"""`featsteer steer` modes for SAE features (see `featsteer.sae.EDIT_MODES`)."""


def _steer_prompts(args: argparse.Namespace) -> list[str]:

    prompts = list(args.prompt or [])
    if any(not prompt.strip() for prompt in prompts):
        raise FeatsteerError("--prompt is empty: give the instruction to steer on (or drop it and use --prompts SRC)")
    if args.prompts:
        prompts += list(_load_prompts(args, args.prompts, limit=args.n).prompts)
    if not prompts:
        raise FeatsteerError("steer has no prompts: give --prompt TEXT (repeatable) or --prompts SRC")
    return prompts


def _check_steer_args(args: argparse.Namespace) -> None:
    """Option clashes, found before any model is loaded; then the defaults of the options left unset."""
    _check_steer_options_apply(args)
    args.scale = 1.0 if args.scale is None else args.scale
    args.threshold = 0.0 if args.threshold is None else args.threshold
    args.ablate_at = args.ablate_at or "writes"
    _check_steer_sources(args)


def _check_steer_options_apply(args: argparse.Namespace) -> None:
    """An option the chosen mode would ignore is an error, not silently dropped."""
    directions = args.directions is not None
    for flag, given, modes in (("--scale", args.scale is not None, ("add", "conditional")),
                               ("--threshold", args.threshold is not None, ("conditional",)),
                               ("--ablate-at", args.ablate_at is not None, ("ablate",))):
        if given and not (directions and args.mode in modes):
            raise FeatsteerError(f"{flag} applies to --directions with --mode {'|'.join(modes)}, not to --mode {args.mode}"
                                 + ("" if directions else " of --sae or --experts"))
    if directions and args.value is not None and args.mode != "set":
        raise FeatsteerError(f"--value applies to --mode set (or to --sae features), not to --directions with --mode {args.mode}")
    for flag, number in (("--scale", args.scale), ("--value", args.value), ("--multiple", args.multiple), ("--threshold", args.threshold),
                         ("--alpha", args.alpha), ("--angle", args.angle)):
        if number is not None and not math.isfinite(number):  # a NaN threshold never fires; the others give NaN logits
            raise FeatsteerError(f"{flag} must be a finite number, got {number}")


def _check_steer_sources(args: argparse.Namespace) -> None:
    if sum(source is not None for source in (args.directions, args.sae, args.experts)) != 1:
        raise FeatsteerError("steer needs one source: --directions DIR, --sae SRC with --feature ID, or --experts LAYER:E[,E][;LAYER:E]")
    if args.direction_index is not None and args.directions is None:
        raise FeatsteerError("--direction-index picks an entry of --directions DIR: drop it, or add --directions")
    if args.experts is not None:
        if args.mode not in EXPERT_STEER_MODES:
            raise FeatsteerError(f"--experts takes --mode {'|'.join(EXPERT_STEER_MODES)}, not --mode {args.mode}")
        ignored = [flag for flag, given in (("--positions", args.positions), ("--value", args.value), ("--multiple", args.multiple),
                                            ("--hook", args.hook), ("--feature", args.feature)) if given is not None]
        if ignored:
            raise FeatsteerError(f"--experts switches experts at every token of the MoE layers it names and takes no {', '.join(ignored)}: "
                                 f"drop {'it' if len(ignored) == 1 else 'them'}")
        args.expert_ids = _layer_ids(args.experts)
    elif args.experts_at != "routing":
        raise FeatsteerError("--experts-at applies to --experts")
    elif args.sae is not None:
        if args.mode not in FEATURE_STEER_MODES:
            raise FeatsteerError(f"--mode {args.mode} steers a direction: SAE features take --mode {'|'.join(FEATURE_STEER_MODES)}")
        if not args.feature:
            raise FeatsteerError("--sae needs the features to edit: --feature ID (repeatable, or comma-separated)")
        args.feature_ids = _feature_ids(args.feature)
        if args.mode in ("clamp", "scale", "add") and (args.value is None) == (args.multiple is None):
            raise FeatsteerError(f"--mode {args.mode} needs exactly one of --value V or --multiple M (M times each feature's largest activation on the prompts)")
        if args.mode == "scale" and args.multiple is not None:
            raise FeatsteerError("--mode scale multiplies by --value; --multiple sets clamp or add amounts")
        if args.mode == "ablate" and (args.value is not None or args.multiple is not None):
            raise FeatsteerError("--mode ablate sets the features to zero and takes no --value or --multiple (for another value use --mode clamp)")
    else:
        if args.mode not in DIRECTION_STEER_MODES:
            raise FeatsteerError(f"--mode {args.mode} edits SAE features (--sae): a direction takes --mode {'|'.join(DIRECTION_STEER_MODES)}")
        if args.feature or args.multiple is not None:
            raise FeatsteerError("--feature and --multiple apply to --sae features, not to --directions")
        if args.positions is not None and args.mode not in ("add", "conditional"):
            raise FeatsteerError(f"--positions applies to --sae features and to --mode add|conditional, not to --mode {args.mode}")
        if args.mode == "angular" and args.angle is None:
            raise FeatsteerError("--mode angular needs --angle DEG (degrees from the refusal direction: 0 full refusal, 180 against it)")
        if args.mode in ("ace", "angular") and (args.hook is not None or args.direction_index is not None):
            raise FeatsteerError(f"--mode {args.mode} acts at every layer (ACE at each hook whose class means the direction records, "
                                 f"angular at --angle-at), so it takes no {'--hook' if args.hook is not None else '--direction-index'}")
    if args.mode != "angular" and (args.angle is not None or args.angle_everywhere or args.angle_at != "layers"):
        raise FeatsteerError("--angle, --angle-everywhere and --angle-at apply to --mode angular")
    if args.mode != "ace" and args.alpha is not None:
        raise FeatsteerError("--alpha applies to --mode ace")
    if args.mode != "conditional" and args.pool != "mean":
        raise FeatsteerError("--pool applies to --mode conditional")
    if args.gate is not None and (args.directions is None or args.mode not in ("ablate", "add") or args.ablate_at != "writes"):
        raise FeatsteerError("--gate applies to --directions with --mode ablate (at the writes) or --mode add")


def _layer_ids(spec: str, option: str = "--experts", example: str = "1:3,5;2:0") -> dict[int, list[int]]:
    """`1:3,5;2:0` -> `{1: [3, 5], 2: [0]}` (experts, or heads, per layer)."""
    ids: dict[int, list[int]] = {}
    try:
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            layer, _, items = part.partition(":")
            ids.setdefault(int(layer), []).extend(int(e) for e in items.split(",") if e.strip())
    except ValueError:
        ids = {}
    if not ids or not all(ids.values()):
        what = "E" if option == "--experts" else "H"
        hint = "see `featsteer experts` for candidates" if option == "--experts" else "or top:N"
        raise FeatsteerError(f"{option} '{spec}' is not LAYER:{what}[,{what}][;LAYER:{what}], e.g. {example} ({hint})")
    return ids


def _feature_ids(specs: Sequence[str]) -> list[int]:
    ids = []
    for spec in specs:
        for part in spec.split(","):
            try:
                ids.append(int(part))
            except ValueError:
                raise FeatsteerError(f"--feature takes integer feature ids, got '{part}'") from None
    return list(dict.fromkeys(ids))


ABLATE_AT = {
    "writes": "every residual write",
    "residual": "every resid_pre, resid_mid and resid_post",
    "blocks": "every block's normalised attention and MLP inputs (the stream untouched)",
    "unembedding": "the unembedding's input, ln_final.hook_normalized (the stream untouched)",
    "readers": "every reader: each block's attention and MLP inputs and the unembedding's (the stream untouched)",
}
"""`featsteer steer --mode ablate --ablate-at`: where the direction is removed (`directions.readers` measures the last three)."""


def _ablation_sites(model, where: str) -> str | list[str]:
    from featsteer.directions.readers import reader_groups
    from featsteer.interventions import RESIDUAL, WRITES

    if where in ("writes", "residual"):
        return WRITES if where == "writes" else RESIDUAL
    return reader_groups(model, per_layer=False)["every reader" if where == "readers" else where]


def _direction_intervention(args: argparse.Namespace, model):
    from featsteer.directions import DirectionSet, weighted_basis
    from featsteer.interventions import Ablate, AddDirection, ConditionalSteer, ProjectionSet

    directions = DirectionSet.load(args.directions)
    if args.mode in ("ace", "angular"):
        return _geometric_intervention(args, model, directions)
    index = _steered_entry(args, directions)
    hook = args.hook or directions.hook_names[index]
    model.hook_site(hook)
    basis = directions.bases[index]
    if float(basis.norm()) == 0:
        raise FeatsteerError(f"the direction at {directions.hook_names[index]} position {directions.positions[index]} in {args.directions} is a "
                             "zero vector (the two sets' means coincide there): choose another")
    if args.mode != "ablate" and basis.shape[0] > 1:
        raise FeatsteerError(f"--mode {args.mode} steers along one direction, but {args.directions} holds a rank-{basis.shape[0]} subspace: "
                             "ablate it (--mode ablate), or use a rank-1 direction")
    if args.mode == "ablate" and args.hook and len(directions) == 1:
        raise FeatsteerError(f"--mode ablate removes the direction at --ablate-at's hooks ({args.ablate_at}), not at one --hook: drop --hook "
                             "(it picks a direction from a folder of several)")
    vector, added = _addition_vector(directions, index, hook, basis[0])
    # an SVD subspace is ablated as the selection scored it: each row damped by its ridge weight
    weighted, projector = "ridge_weights" in directions.scores, weighted_basis(directions, index)
    damped = ", ridge-weighted" if weighted else ""
    value = _set_value(args, directions, index, hook) if args.mode == "set" else None
    tokens = args.positions or "all"
    on = "" if tokens == "all" else f" ({tokens} tokens only)"
    built = {
        "ablate": lambda: (Ablate(projector, where=_ablation_sites(model, args.ablate_at), weighted=weighted),
                           f"ablate the direction from {ABLATE_AT[args.ablate_at]} (rank {basis.shape[0]}{damped})"),
        "add": lambda: (AddDirection(vector, args.scale, where=hook, positions=tokens), f"add {args.scale:g} x {added} at {hook}{on}"),
        "set": lambda: (ProjectionSet(basis[0], value, where=hook), f"set the projection to {value:.3g} at {hook}"),
        "conditional": lambda: (ConditionalSteer(basis[0], hook, args.threshold, AddDirection(vector, args.scale, where=hook, positions=tokens),
                                                 pool=args.pool),
                                f"add {args.scale:g} x {added} at {hook}{on} where the cosine of the prompt's "
                                f"{'mean' if args.pool == 'mean' else 'last-token'} activation exceeds {args.threshold:g}"),
    }
    intervention, what = built[args.mode]()
    if args.gate:
        intervention, what = _gated(args, model, intervention, what, projector, hook, weighted)
    return intervention, what


def _addition_vector(directions, index: int, hook: str, direction):
    """What `--mode add|conditional` adds per unit of `--scale` at `hook`, and how the line names it: the mean difference
    along the direction at that hook (where it was read, or at another layer from the per-layer class means a chosen
    direction records); with no record at `hook`, the length measured where it was read, and the line says where; with
    no length at all, the unit direction."""
    norms = directions.scores.get("mean_diff_norm")
    if not norms:
        return direction, "the unit direction"
    read_at = directions.hook_names[index]
    if hook == read_at:
        return direction * float(norms[index]), "the mean difference"
    per_layer = directions.provenance.get("ace", {})
    if hook in per_layer.get("harmful", {}) and hook in per_layer.get("harmless", {}):
        length = float(per_layer["harmful"][hook]) - float(per_layer["harmless"][hook])
        return direction * length, f"the mean difference along the direction there ({length:.3g})"
    return direction * float(norms[index]), f"the mean difference measured at {read_at} ({float(norms[index]):.3g})"


def _set_value(args: argparse.Namespace, directions, index: int, hook: str) -> float:
    """`--mode set`'s projection: `--value`, else the direction's mean harmful projection at the hook it steers (recorded
    where it was read, and per layer with a chosen direction); another layer's would be on another scale."""
    if args.value is not None:
        return args.value
    projections = directions.scores.get("harmful_projection")
    if hook == directions.hook_names[index] and projections:
        return float(projections[index])
    per_layer = directions.provenance.get("ace", {}).get("harmful", {})
    if hook in per_layer:
        return float(per_layer[hook])
    if not projections:
        raise FeatsteerError(f"{args.directions} records no mean harmful projection (method {directions.method}): give --value V")
    raise FeatsteerError(f"{args.directions} records the mean harmful projection at {directions.hook_names[index]}, not at {hook}: "
                         "give --value V, or steer where the direction was read")


def _steered_entry(args: argparse.Namespace, directions) -> int:
    """Which of a saved set's directions `steer` uses: entry `--direction-index`, its only one, or the one at `--hook` (the
    last position's when the hook has several); with several and no `--hook`, or several at the hook's last position (two
    SAE features at one hook), an error that lists them (a candidates/ folder holds every layer's)."""
    if args.direction_index is not None:
        _check_direction_index(args, directions)
        return args.direction_index
    at_hook = [i for i, name in enumerate(directions.hook_names) if name == args.hook]
    if len(at_hook) == 1:
        return at_hook[0]
    if at_hook:
        last = [i for i in at_hook if directions.positions[i] == -1]
        if len(last) == 1:
            return last[0]
        raise _too_many(args, directions, last or at_hook)
    if len(directions) == 1:
        return 0  # one direction, steered where it was read or, with --hook, at another hook
    if args.hook:
        raise FeatsteerError(f"{args.directions} holds no direction at {args.hook}; it holds {', '.join(sorted(set(directions.hook_names)))}")
    raise _too_many(args, directions, list(range(len(directions))))


def _too_many(args: argparse.Namespace, directions, entries: list[int]) -> FeatsteerError:
    return FeatsteerError(f"{args.directions} holds {len(entries)} directions{' at ' + args.hook if args.hook else ''} "
                          f"({_entries_listed(directions, entries)}): pass the chosen/ folder of `featsteer directions`, name one with "
                          "--hook, or pick one by entry number with --direction-index I")


def _entries_listed(directions, entries: list[int]) -> str:
    """The first six of a saved set's `entries`, each with its entry number, hook, position and any SAE feature ids."""
    return "; ".join(directions.entry_label(i) for i in entries[:6]) + ("; ..." if len(entries) > 6 else "")


def _check_direction_index(args: argparse.Namespace, directions) -> None:
    if args.direction_index is not None and not 0 <= args.direction_index < len(directions):
        raise FeatsteerError(f"--direction-index {args.direction_index} is out of range: {args.directions} holds {len(directions)} "
                             f"direction{'s' if len(directions) > 1 else ''} (entries 0..{len(directions) - 1})")


def _gated(args: argparse.Namespace, model, intervention, what: str, basis, hook: str, weighted: bool = False):
    """`--gate DIR`: the ablation or addition applied only to the prompts the saved gate fires on. The gate decides the
    ablation (and an addition at a hook before its own) in a pre-pass of the prompt, so a prompt it fires on is steered
    exactly as without the gate."""
    from featsteer.interventions.condition import Gate

    gate = Gate.load(args.gate)
    where = f"only where the gate at {gate.hook} ({_POOLED[gate.pool]}) fires"
    if args.mode == "ablate":
        return (gate.ablate(model, basis, weighted=weighted), f"ablate the direction from every residual write (rank {basis.shape[0]}), {where} "
                "(decided in a pre-pass of the prompt)")
    gate.check(model)
    early = model.hook_site(hook).order < model.hook_site(gate.hook).order  # the gate reads a later layer: decide first
    return gate.steer(intervention, lookahead=early), f"{what}, {where}" + (" (decided in a pre-pass of the prompt)" if early else "")


_POOLED = {"mean": "mean over the prompt", "last": "last token"}
"""How a gate's pooling reads in the CLI's lines."""


def _geometric_intervention(args: argparse.Namespace, model, directions):
    """`--mode ace|angular` from what `featsteer directions` recorded with the chosen direction."""
    import torch

    from featsteer.interventions import AffineEdit, AngularSteer

    provenance, where = directions.provenance, args.directions
    if len(directions) != 1 or directions.rank != 1:
        raise FeatsteerError(f"--mode {args.mode} needs one rank-1 direction, and {where} holds {len(directions)} of rank {directions.rank}: "
                             "pass the chosen/ folder of a `featsteer directions --method dim|projected|pca|linear|whitened` run")
    direction = directions.bases[0, 0]
    if directions.method.startswith("optimized:") and not {"ace", "rotation_axis"} & set(provenance):
        raise FeatsteerError(f"--mode {args.mode} reads class means and a rotation axis recorded for the found direction, which a trained "
                             f"direction ({where}) lacks: pass the chosen/ folder beside it")
    if args.mode == "ace":
        if "ace" not in provenance:
            raise FeatsteerError(f"{where} has no per-layer class means: re-run `featsteer directions` (it records them with the chosen direction)")
        harmless, harmful = provenance["ace"]["harmless"], provenance["ace"]["harmful"]
        for hook in harmless:
            model.hook_site(hook)
        alpha = 0.0 if args.alpha is None else args.alpha
        return (AffineEdit(direction, harmless, harmful, alpha),
                f"set the projection at {len(harmless)} hooks to alpha={alpha:g} on the harmless-to-harmful mean line (ACE)")
    if "rotation_axis" not in provenance:
        raise FeatsteerError(f"{where} has no rotation axis: re-run `featsteer directions` with a model whose layers' directions differ")
    axis = torch.tensor(provenance["rotation_axis"], dtype=direction.dtype)
    if axis.shape != direction.shape:
        raise FeatsteerError(f"{where}: the rotation axis has {axis.numel()} entries, the direction {direction.numel()}")
    from featsteer.interventions import LAYERS, NORMS

    where = NORMS if args.angle_at == "norms" else LAYERS
    intervention = AngularSteer(torch.stack([direction, axis]), args.angle, where=where, adaptive=not args.angle_everywhere)
    scope = "every activation" if args.angle_everywhere else "activations leaning towards refusal"
    site = "every block's normalised attention and MLP inputs" if where == NORMS else "every layer's residual input"
    return intervention, f"turn {scope} to {args.angle:g} degrees from the direction at {site} (angular steering)"


def _feature_intervention(args: argparse.Namespace, model, prompts: list[str]):
    from featsteer.features.effects import max_feature_activations
    from featsteer.sae import FeatureEdit, FeatureSteer, load_sae_source

    saes = load_sae_source(args.sae, model)
    if args.hook is None and len(saes) > 1:
        raise FeatsteerError(f"--sae {args.sae} holds {len(saes)} SAEs: choose one with --hook ({', '.join(saes)})")
    hook = args.hook or next(iter(saes))
    if hook not in saes:
        raise FeatsteerError(f"--sae {args.sae} has no SAE at {hook}: use one of {', '.join(saes)}")
    sae = saes[hook]
    features = args.feature_ids  # parsed by _check_steer_args
    outside = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if outside:
        raise FeatsteerError(f"feature id {outside[0]} is out of range: the SAE at {hook} has d_sae={sae.cfg.d_sae} (ids 0..{sae.cfg.d_sae - 1})")
    maxima = max_feature_activations(model, sae, prompts, system=args.system)[features]
    for feature, peak in zip(features, maxima.tolist(), strict=True):
        print(f"feature {feature} at {hook}: largest activation on the prompts {peak:.3f}")
    silent = [f for f, peak in zip(features, maxima.tolist(), strict=True) if peak == 0]
    if args.multiple is not None and args.multiple != 0 and silent:
        change = "clamp it to 0 (an ablation)" if args.mode == "clamp" else "add 0 to it"
        raise FeatsteerError(f"feature {silent[0]} never fires on these prompts, so --multiple {args.multiple:g} x its largest activation "
                             f"would {change}: give --value V, or prompts it fires on")
    if args.mode == "ablate":
        edits = [FeatureEdit.ablate(features)]
        what = f"ablate features {features}"
    elif args.multiple is not None:
        edits = [FeatureEdit(args.mode, (f,), args.multiple * peak) for f, peak in zip(features, maxima.tolist(), strict=True)]
        what = f"{args.mode} features {features} {'to' if args.mode == 'clamp' else 'by'} {args.multiple:g} x their largest activation"
    else:
        edits = [FeatureEdit(args.mode, tuple(features), args.value)]
        what = f"{args.mode} features {features} {'by' if args.mode != 'clamp' else 'to'} {args.value:g}"
    positions = args.positions or "all"
    return FeatureSteer(sae, edits, positions=positions), f"{what} at {hook} ({positions} tokens)"


def _cmd_steer(args: argparse.Namespace) -> int:
    from featsteer.evaluation import LoopDetector, RefusalDetector
    from featsteer.interventions import steer

    _check_steer_args(args)
    prompts = _steer_prompts(args)
    model = _load_model(args)
    if args.experts is not None:
        from featsteer.interventions import ExpertSteer

        intervention = ExpertSteer(**{args.mode: args.expert_ids}, at=args.experts_at)
        intervention.hooks_for(model)  # a layer or expert the model lacks fails here, before any generation
        what = f"{args.mode} experts " + "; ".join(f"layer {layer}: {experts}" for layer, experts in args.expert_ids.items())
        what += " (router logits, SteerMoE)" if args.experts_at == "router_logits" else " (routing weights)"
    elif args.sae is not None:
        intervention, what = _feature_intervention(args, model, prompts)
    else:
        intervention, what = _direction_intervention(args, model)
    detector, loops = RefusalDetector(), LoopDetector()
    plain = model.generate(prompts, max_new_tokens=args.max_new_tokens, system=args.system)
    with steer(model, intervention):
        steered = model.generate(prompts, max_new_tokens=args.max_new_tokens, system=args.system)
    refused = [[detector.is_refusal(text) for text in texts] for texts in (plain, steered)]
    looping = [loops.classify(texts) for texts in (plain, steered)]
    print(f"steer: {what}")
    width = max(8, len(args.mode) + 1)  # one label column for both rows: `conditional:` and `deactivate:` are wider than 8
    for i, prompt in enumerate(prompts):
        marks = [_marks(refused[k][i], looping[k][i]) for k in (0, 1)]
        print(f"prompt:  {prompt}\n  {'plain:':{width}} {plain[i]}{marks[0]}\n  {args.mode + ':':{width}} {steered[i]}{marks[1]}")
    summary = f"refused: plain {sum(refused[0])}/{len(prompts)}, {args.mode} {sum(refused[1])}/{len(prompts)}"
    if any(looping[0]) or any(looping[1]):
        summary += f"; looping: plain {sum(looping[0])}/{len(prompts)}, {args.mode} {sum(looping[1])}/{len(prompts)}"
    print(summary)
    if args.json:
        _write_json(args.json, {
            "model": args.model, "mode": args.mode, "intervention": what, "source": args.directions or args.sae, "system": args.system,
            "refused_plain": sum(refused[0]), "refused_steered": sum(refused[1]), "n": len(prompts),
            "looping_plain": sum(looping[0]), "looping_steered": sum(looping[1]),
            "rows": [{"prompt": p, "plain": a, "steered": b, "plain_refused": ra, "steered_refused": rb, "plain_looping": la,
                      "steered_looping": lb}
                     for p, a, b, ra, rb, la, lb in zip(prompts, plain, steered, *refused, *looping, strict=True)],
        })
    return 0


def _marks(refused: bool, looping: bool) -> str:
    """`  [refused]`, `  [looping]`, both, or nothing, after a printed response."""
    tags = [tag for tag, on in (("refused", refused), ("looping", looping)) if on]
    return f"  [{', '.join(tags)}]" if tags else ""


def _check_compare_options_apply(args: argparse.Namespace) -> None:
    """A method setting for a method that will not run is an error, not a value recorded in results.json as if used."""
    methods = set(args.methods.split(",")) if args.methods else None
    for flag, given in (("--sae-top-k", args.sae_top_k), ("--sae-clamp-multiple", args.sae_clamp_multiple),
                        ("--sae-induce-multiple", args.sae_induce_multiple)):
        if given is not None and not args.sae:
            raise FeatsteerError(f"{flag} sets an SAE method, which runs only with --sae: add --sae SRC or drop {flag}")
    for flag, given, needs in (("--ace-alpha", args.ace_alpha is not None, {"dim_ace_hook"}),
                               ("--ace-induce-alpha", args.ace_induce_alpha is not None, {"dim_ace_induce"}),
                               ("--angle", args.angle is not None, {"dim_angular_hook", "dim_angular_norms_hook"}),
                               ("--angle-everywhere", args.angle_everywhere, {"dim_angular_hook", "dim_angular_norms_hook"})):
        if given and methods is not None and not methods & needs:
            raise FeatsteerError(f"{flag} sets {' / '.join(sorted(needs))}, which --methods leaves out: add it or drop {flag}")


def _cmd_compare(args: argparse.Namespace) -> int:
    from featsteer.compare import (
        DEFAULT_MAX_NLL_RISE,
        SaeMethodConfig,
        SteeringMethodConfig,
        available_methods,
        compare,
        write_report,
    )
    from featsteer.directions.optimize import OptimizeConfig
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.sae import load_sae_source

    if args.list:
        plain = available_methods(saes=False)
        for name, description in available_methods().items():
            print(f"{name:24} {description}{'' if name in plain else ' [needs --sae]'}")
        return 0
    if not (args.harmful and args.harmless and args.out):
        raise FeatsteerError("compare needs --harmful, --harmless and --out (or --list)")
    # an earlier run's responses.json (and its responses.labels.json) beside this run's results would read as one run
    check_empty_folder(args.out)
    _check_compare_options_apply(args)
    if args.method != "dim" or args.rank is not None:  # recorded in results.json, but every method finds its own direction
        raise FeatsteerError("compare runs every direction method itself (svd2_abliteration is rank 2): drop --method/--rank "
                             "and choose methods with --methods")
    if args.eval_n is not None and not (args.eval_harmful and args.eval_harmless):
        raise FeatsteerError("--eval-n cuts --eval-harmful and --eval-harmless: without them the evaluation is the last quarter of the "
                             "training sets, sized by --n")
    if args.angle is not None and not math.isfinite(args.angle):
        raise FeatsteerError(f"--angle must be a finite number of degrees, got {args.angle}")
    sae_config = SaeMethodConfig(top_k=args.sae_top_k, clamp_multiple=args.sae_clamp_multiple, induce_multiple=args.sae_induce_multiple,
                                 tolerance=args.pick_tolerance)
    steering_config = SteeringMethodConfig(ace_alpha=args.ace_alpha, ace_induce_alpha=args.ace_induce_alpha, angle=args.angle,
                                           tolerance=args.pick_tolerance,
                                           adaptive=not args.angle_everywhere)
    if args.optimize_steps < 1:  # before the model loads
        raise FeatsteerError(f"--optimize-steps must be at least 1, got {args.optimize_steps}")
    optimize_config = OptimizeConfig(steps=args.optimize_steps).with_options(args.optimize_option or [], "--optimize-option")
    harmful, harmless = _load_pair(args)
    val = _load_val(args)
    evals = [_load_prompts(args, s, args.eval_n, "--eval-n") if s else None for s in (args.eval_harmful, args.eval_harmless)]
    alarming = _load_prompts(args, args.alarming, args.eval_n, "--eval-n") if args.alarming else None
    direction_config = _direction_config(args)
    model = _load_model(args)
    judge = _load_judge(args, model) if args.judge else None
    comparison = compare(
        model, harmful, harmless, methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None,
        eval_harmful=evals[0], eval_harmless=evals[1], alarming=alarming, direction_config=direction_config,
        val_harmful=val[0] if val else None, val_harmless=val[1] if val else None,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system),
        saes=load_sae_source(args.sae, model) if args.sae else None, sae_config=sae_config, steering_config=steering_config,
        baseline=args.baseline, n_pick=args.n_pick, pick_kl=args.pick_kl, judge=judge,
        max_nll_rise=DEFAULT_MAX_NLL_RISE if args.pick_max_nll_rise is None else None if args.pick_max_nll_rise == "off" else args.pick_max_nll_rise,
        optimize_config=optimize_config,
    )
    folder = Path(args.out).expanduser()
    with staged_output(folder) as work:  # the folder appears with every file or not at all: none left half-written
        write_report(comparison, work)
    print(comparison.table())
    _print_paired(comparison)
    _print_coherence(comparison)
    if "judge" in comparison.setup:
        judge = comparison.setup["judge"]
        anchors = "" if judge["anchors"] is None else (f", fitted on {judge['anchors']['n']} anchors (accuracy "
                                                       f"{judge['anchors']['accuracy']:.2f}, AUC {judge['anchors']['auc']:.2f})")
        print(f"judge {judge['name']}: threshold {judge['threshold']:.3f}{anchors}; its rates are the last column")
    for result in comparison.results:
        if "sae_hook" in result.details:
            picked = f" (picked {result.details['setting']} on validation)" if "sae_validation" in result.details else ""
            print(f"  {result.method}: {result.details['sae_hook']} features {result.details['sae_features']}{picked}")
    for failed in comparison.failed:  # the other methods' figures stand: the run succeeds, and says what it lacks
        print(f"\nfailed: {failed.method}: {failed.error}")
    print(f"\nwrote {folder}/results.json, report.html, pareto.png, responses.json")
    print(f"read the responses by hand: featsteer label {folder} --method METHOD")
    return 0


def _nats_or_off(text: str) -> float | str:
    """`--pick-max-nll-rise`: a finite number of nats per token, or `off`."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number of nats per token such as 0.5, or off for no bound; got {text!r}")
    return value


def _print_coherence(comparison) -> None:
    """The methods whose harmless answers the unedited model finds far less likely than its own, when there are any."""
    if warnings := comparison.coherence_warnings():
        print("\ncoherence: " + "\ncoherence: ".join(warnings))
    if exclusions := comparison.bound_exclusions():
        print("\nbound: " + "\nbound: ".join(exclusions))


def _print_paired(comparison) -> None:
    """The paired table under a comparison's table, when it has a baseline."""
    table = comparison.paired_table()
    if table is not None:
        print("\npaired with the baseline on the same prompts: difference (prompts only the baseline / only the method "
              "counts, McNemar exact p); KL: mean per-prompt difference [95% bootstrap interval]")
        print(table)


def _cmd_probe(args: argparse.Namespace) -> int:
    from featsteer.pipeline import split
    from featsteer.probe_report import (
        DEFAULT_CONTROL,
        PROBE_FOLDS,
        control_key,
        probe_report,
        write_probe_report,
    )

    layers = _layers_option(args.layers)  # a bad list or control fails before the model loads
    control = args.control or DEFAULT_CONTROL
    control_key(control)
    harmful, harmless = _load_pair(args)
    model = _load_model(args)
    (harmful_train, harmful_test), (harmless_train, harmless_test) = split(harmful, 0.3), split(harmless, 0.3)
    saes = None
    if args.sae:
        from featsteer.sae import load_sae_source

        saes = load_sae_source(args.sae, model)
    report = probe_report(model, (harmful_train, harmless_train), (harmful_test, harmless_test), positions=args.positions,
                          n_effect=args.n_effect, batch_size=args.batch_size, saes=saes, layers=layers,
                          control=control, system=args.system)
    folder = write_probe_report(report, args.out, f"featsteer probe report: {model.name}")
    print(f"control task: {report.control_text()}")
    print(f"{'hook':26} " + " ".join(f"{k + ' acc/sel':>22}" for k in report.sweep))
    for i, hook in enumerate(report.hooks):
        cells = " ".join(f"{rows[i].accuracy:>13.3f}/{rows[i].selectivity:<8.3f}" for rows in report.sweep.values())
        print(f"{hook:26} {cells}")
    best = report.best("linear")
    print(f"\nbest linear-probe layer: {best.key} (chosen by {PROBE_FOLDS}-fold CV on the training prompts, accuracy {best.cv_accuracy:.3f}; "
          f"held-out accuracy {best.accuracy:.3f}, selectivity {best.selectivity:.3f}, controls' sd {best.control_std:.3f})")
    for source, pairs in report.sae_sources.items():
        print(f"{source}: " + ", ".join(f"{sae_hook} at {swept}" for swept, sae_hook in pairs.items()))
    for effect in (e for e in report.effects if e.source.startswith("sae")):
        print(f"  {effect.source} layer {effect.layer}: AUROC {effect.auroc:.3f}, refusal drop {effect.refusal_drop:.3f}, KL {effect.kl_harmless:.4f}")
    print(f"wrote {folder}/report.html, results.json, sweep.png, sweep.md")
    return 0


def _cmd_rank_features(args: argparse.Namespace) -> int:
    import math

    from featsteer.activations import Positions
    from featsteer.feature_report import (
        outside_domain_note,
        rank_features,
        ranking_key,
        untrained_head_note,
        write_feature_report,
    )
    from featsteer.sae import load_sae_source

    by = ranking_key(args.by)
    Positions.parse(args.positions)
    if args.top < 1:
        raise FeatsteerError(f"--top must be at least 1, got {args.top}")
    harmful, harmless = _load_pair(args)
    model = _load_model(args)
    saes = load_sae_source(args.sae, model)
    ranking = rank_features(model, saes, harmful, harmless, positions=args.positions, top_n=args.top, by=by,
                            normalize=args.normalise, units=args.units, batch_size=args.batch_size, system=args.system)
    folder = write_feature_report(ranking, args.out)

    def cell(value: float | None, width: int) -> str:
        return f"{value:{width}.3f}" if value is not None and math.isfinite(value) else f"{'n/a':>{width}}"

    # the ranking's own column joins the table when it is not one of its usual three, so the order can be read off it
    metric = by.removeprefix("abs_")
    key_width = 0 if metric in ("composite", "mean_difference", "auroc") else max(len(metric), 8)
    key_head = f" {metric:>{key_width}}" if key_width else ""
    print(f"{'rank':>4}  {'hook':28} {'feature':>7} {'composite':>10} {'differential':>12} {'AUROC':>6}{key_head} {'DIM cos':>8}")
    for detail in ranking.features:
        row = detail.scores
        key_cell = f" {cell(row[metric], key_width)}" if key_width else ""
        print(f"{ranking.rank_label(detail.rank):>4}  {detail.hook_name:28} {detail.feature_id:>7} {cell(row['composite'], 10)} "
              f"{cell(row['mean_difference'], 12)} {cell(row['auroc'], 6)}{key_cell} {cell(detail.dim_cosine, 8)}")
    print(f"\nranked {len(ranking.scores)} features of {len(saes)} SAE(s) on {len(harmful)} harmful / {len(harmless)} harmless "
          f"prompts by {by}{' in residual units' if args.units == 'residual' else ''}; wrote {folder}/report.html, features.csv, features.json")
    note = outside_domain_note(ranking.provenance["rows_outside_domain"]) + untrained_head_note(ranking.provenance["rows_in_untrained_head"])
    if note:
        print(note.strip())
    if ranking.tie_note():
        print(f"{ranking.tie_note()} (=N marks a tied rank)")
    return 0


def _cmd_experts(args: argparse.Namespace) -> int:
    from featsteer.interventions import expert_routing

    if args.top < 1:
        raise FeatsteerError(f"--top {args.top} lists no experts: give at least 1")
    harmful, harmless = _load_pair(args)
    model = _load_model(args)
    routing = expert_routing(model, list(harmful), list(harmless), positions=args.positions, batch_size=args.batch_size,
                             system=args.system)
    print(f"model     {model.name}")
    print(f"routing   {len(routing.layers)} MoE layers x {routing.n_experts} experts; read {routing.n_tokens[0]} harmful and "
          f"{routing.n_tokens[1]} harmless tokens ({routing.positions}) of {len(harmful)} / {len(harmless)} prompts")
    for toward in ("harmful", "harmless"):
        print(f"\nrouted more often on {toward} prompts (risk difference = harmful rate - harmless rate; 95% bootstrap interval over prompts)")
        print("| rank | layer | expert | harmful rate | harmless rate | risk difference | 95% CI |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        leaning = routing.leaning(toward)
        if not leaning:
            print(f"| - | - | - | - | - | none routed more often on {toward} prompts | - |")
        for rank, score in enumerate(leaning[:args.top], 1):
            print(f"| {rank} | {score.layer} | {score.expert} | {score.harmful_rate:.3f} | {score.harmless_rate:.3f} | {score.risk_difference:+.3f} | "
                  f"[{score.ci[0]:+.3f}, {score.ci[1]:+.3f}] |")
    if args.json:
        _write_json(args.json, {"model": model.name, "system": args.system, **routing.to_dict(args.top)})
        print(f"\nwrote {args.json}")
    return 0


def _write_json(path: str, payload: dict) -> None:
    from featsteer.files import json_text, write_files

    target = Path(path)
    write_files(target.parent, {target.name: json_text(payload)})


_OPTIMIZE_OPTION_HELP = ("how the direction optimisation trains, as an OptimizeConfig field, e.g. retain_weight=3, retain_first_weight=15, "
                         "refusal_weight=3, ablation_targets=affirm, n_prompts=192, seed=1 or max_batch_tokens=none; repeat it for several")


_COLUMN_HELP = "column for csv/json/jsonl/parquet prompt files"
_SYSTEM_HELP = ("system prompt of every prompt the run formats (training, selection, picks, checks), as `featsteer eval --system` "
                "formats them; recorded with the outputs")
_BATCH_HELP = "prompts per forward pass (default 16)"
_BATCH_TOKENS_HELP = "cap on a batch's padded prompt tokens, rows x longest prompt (default 8192)"
_MAX_NEW_HELP = "cap on generated tokens per response (default 32)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="featsteer", description="Find and steer the features behind refusal.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_judge_args(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--judge", metavar="SPEC", help="a second opinion on every refusal verdict: markers | chat:MODEL_SPEC (a chat "
                       "model asked whether each reply does what was asked; chat:SAME_AS_--model reuses the loaded model, unedited) | "
                       f"classifier:PATH_OR_HUB_ID (a refusal classifier); {what}")
        p.add_argument("--judge-threshold", type=float, metavar="P", help="the judge's verdict threshold on P(refusal) "
                       "(default: fitted on the 44 shipped anchors for chat judges, 0.5 for classifiers)")
        p.add_argument("--judge-label", help="the classifier's refusal class, by name or index (default: the one label naming a rejection)")

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="organism",
                       help="organism | tiny:FAMILY | a Hugging Face model folder | a .gguf file | a hub id (default: organism)")
        p.add_argument("--dtype", default="float32", metavar="DTYPE",
                       help="weights' dtype: float32 (default) | bfloat16 | float16 | auto (the checkpoint's own); "
                            "directions and edits are computed in float32/float64 either way")
        p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | mps")
        p.add_argument("--escape-special", action="store_true",
                       help="tokenize special-token text inside a prompt, the system prompt or a prefill ('<|im_end|>') as "
                            "plain text, not as the token that would end the turn (without it such texts get a warning)")
        p.add_argument("--harmony-opening", choices=("final", "none"), default="final",
                       help="harmony models (GPT-OSS) only: 'final' (default) ends the prompts that first-token measures and "
                            "capture read with <|channel|>final<|message|>, where the answer starts; 'none' reads them at "
                            "<|start|>assistant, where the model always writes <|channel|> next (generation starts there either way)")

    info = sub.add_parser("info", help="describe a model: family, layers, hook points, chat format")
    add_model_args(info)
    info.add_argument("--prompt", help="show how this instruction is formatted")
    info.add_argument("--system", help="the system prompt --prompt is shown with")
    info.set_defaults(run=_cmd_info)

    cap = sub.add_parser("capture", help="capture activations for a prompt set to a directory")
    add_model_args(cap)
    cap.add_argument("--prompts", required=True, help="file, builtin:harmful[:split], or hf:NAME")
    cap.add_argument("--hooks", default="all", help="all | KIND[:L1,L2] | KIND:FIRST-LAST | comma-separated hook names")
    cap.add_argument("--positions", default="last", help="last | mean_last:K | post_instruction | instruction_end | all")
    cap.add_argument("--out", required=True, help="a new or empty folder for the safetensors shards and metadata.json")
    cap.add_argument("--column", help=_COLUMN_HELP)
    cap.add_argument("--n", type=int, help="use the first N prompts")
    cap.add_argument("--batch-size", type=int, default=16, help=_BATCH_HELP)
    cap.add_argument("--max-batch-tokens", type=int, help=_BATCH_TOKENS_HELP)
    cap.add_argument("--system", help="system prompt (as `featsteer eval --system`, so the rows are read from the prompts eval formats)")
    cap.add_argument("--shard-rows", type=int, default=65536, help="rows per safetensors shard on disk (default 65536)")
    cap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    cap.set_defaults(run=_cmd_capture)

    ev = sub.add_parser("eval", help="refusal rates on harmful and harmless prompts")
    add_model_args(ev)
    ev.add_argument("--harmful", required=True, help="file, builtin:harmful[:split], or hf:NAME")
    ev.add_argument("--harmless", required=True, help="file, builtin:harmless[:split], or hf:NAME")
    ev.add_argument("--n", type=int, help="use the first N prompts of each set")
    ev.add_argument("--max-new-tokens", type=int, default=32, help=_MAX_NEW_HELP)
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per batch (decoding on CPU is faster with more)")
    ev.add_argument("--max-batch-tokens", type=int, help=_BATCH_TOKENS_HELP)
    ev.add_argument("--system", help="system prompt")
    ev.add_argument("--column", help="column for csv/json/parquet prompt files")
    ev.add_argument("--json", help="write the full result here")
    ev.add_argument("--reference", help="model SPEC to measure KL on harmless prompts against: of the first token, and "
                    "along the reference's own greedy responses (kl_response_harmless)")
    ev.add_argument("--alarming", help="harmless-but-alarming prompts: adds over_refusal_rate")
    ev.add_argument("--prefill", metavar="TEXT|affirm",
                    help="start every harmful response with TEXT (a prefilling attack), or with each prompt's own affirmative "
                         "opening ('affirm': \"Sure, here is a script that ...\"); the model goes on from it and the detector reads "
                         "what it wrote after it. Harmless prompts are not prefilled")
    add_judge_args(ev, "adds judge to the JSON with the judge's rates, its agreement with the markers and every disagreement")
    ev.add_argument("--paired-with", metavar="EVAL_JSON", help="an earlier eval's --json on the same prompts (e.g. before an edit): "
                    "McNemar's exact test of the refusal verdicts, prompt by prompt")
    ev.set_defaults(run=_cmd_eval)

    def add_direction_args(p: argparse.ArgumentParser, extra_methods: tuple[str, ...] = ()) -> None:
        add_model_args(p)
        p.add_argument("--harmful", required=True, help="file, builtin:harmful[:split], or hf:NAME")
        p.add_argument("--harmless", required=True, help="file, builtin:harmless[:split], or hf:NAME")
        p.add_argument("--method", default="dim", choices=["dim", "projected", "pca", "svd", "linear", "whitened", *extra_methods],
                       help="how candidate directions are found (default dim: difference in means)")
        p.add_argument("--rank", type=int, help="subspace size for --method svd (default 2)")
        p.add_argument("--positions", default="post_instruction", help="last | post_instruction | instruction_end | mean_last:K")
        p.add_argument("--n", type=int, help="use the first N prompts of each set")
        p.add_argument("--n-select", type=int, default=32, help="validation prompts per set for selection")
        p.add_argument("--val-harmful", metavar="SRC",
                       help="validation harmful prompts for the selection (with --val-harmless; default: the last quarter of --harmful). "
                            "Use prompts the model was not trained on")
        p.add_argument("--val-harmless", metavar="SRC", help="validation harmless prompts (with --val-harmful)")
        p.add_argument("--kl-threshold", type=float, default=0.1,
                       help="selection drops candidates whose ablation moves harmless first-token logits by more KL than this (default 0.1)")
        p.add_argument("--screen", type=int, metavar="N",
                       help="ablate only the N candidates a first-order (gradient) estimate ranks best, instead of every "
                            "candidate: one backward pass instead of most ablated passes (default: ablate all)")
        p.add_argument("--filter-train", action="store_true",
                       help="keep the train prompts the model treats as labelled (harmful refused, harmless answered; Arditi et al.)")
        p.add_argument("--batch-size", type=int, default=16, help=_BATCH_HELP)
        p.add_argument("--column", help=_COLUMN_HELP)
        p.add_argument("--system", help=_SYSTEM_HELP)
        p.add_argument("--out", required=True, help="output folder (new or empty)")

    dirs = sub.add_parser("directions", help="find candidate refusal directions and select one (Arditi et al.)")
    add_direction_args(dirs)
    dirs.add_argument("--gate", action="store_true", help="also fit a CAST gate (interventions.fit_gate) that tells harmful from harmless "
                      "prompts at a layer up to the chosen direction's, and write it to OUT/gate for `featsteer steer --gate`")
    dirs.add_argument("--optimize", type=int, default=0, metavar="STEPS",
                      help="also train the chosen direction STEPS Adam steps (refusal direction optimisation, as abliterate --optimize) "
                      "and write it to OUT/optimized for `featsteer steer --directions` and `featsteer abliterate --directions`")
    dirs.add_argument("--optimize-option", action="append", metavar="KEY=VALUE", help=_OPTIMIZE_OPTION_HELP)
    dirs.add_argument("--layers", metavar="LIST", help="read candidates at these layers only, e.g. 4-12 or 4,8,12 (default: every "
                      "layer); the last 20%% of the model's layers are still skipped")
    dirs.add_argument("--geometry", choices=["full", "estimate", "quick", "off"], default="full",
                      help="how much of geometry.md to compute for a rank-1 direction: full (default), estimate (the read-side "
                      "ablation's per-block rows as first-order estimates from one gradient pass: 6 exact conditions instead of "
                      "2 + 2 x layers), quick (no per-block rows), off (none)")
    dirs.add_argument("--eval-harmful", metavar="SRC", help="held-out harmful prompts that geometry.md's self-repair and read-side "
                      "ablation read (the first --eval-n, with --eval-harmless; default: the validation prompts the direction was "
                      "selected on, whose refusal log-odds the pick biases upward)")
    dirs.add_argument("--eval-harmless", metavar="SRC", help="held-out harmless prompts for geometry.md (with --eval-harmful)")
    dirs.add_argument("--eval-n", type=int, metavar="N", help="prompts per class that geometry.md's self-repair and read-side ablation "
                      f"read: the first N of --eval-harmful/--eval-harmless, or of the validation sets without them (default {GEOMETRY_EVAL_N})")
    dirs.set_defaults(run=_cmd_directions)

    abl = sub.add_parser("abliterate", help="edit the weights against the selected direction and export the model")
    add_direction_args(abl, extra_methods=("sae",))
    abl.add_argument("--layers", metavar="LIST", help=_SELECT_LAYERS_HELP)
    abl.add_argument("--sae", metavar="SRC", help="SAEs for --method sae: organism | folder of <hook_name>/ SAE folders | one SAE folder")
    abl.add_argument("--sae-top-k", type=int, help="--method sae: decoder rows projected out (default: picked on the validation prompts "
                                                   "from 1, 2, 4, 8, 16, as featsteer compare picks it)")
    abl.add_argument("--directions", metavar="DIR", help="edit against a saved DirectionSet (e.g. DIRS/chosen from `featsteer directions`, "
                                                         "or one saved from Python) instead of fitting a direction")
    abl.add_argument("--direction-hook", metavar="HOOK", help="with --directions: which hook's direction, when the set holds several")
    abl.add_argument("--direction-position", type=int, metavar="P", help="with --directions: which position's direction")
    abl.add_argument("--direction-index", type=int, metavar="I", help="with --directions: entry I of the set (0-based, as errors list "
                     "them), for entries that share a hook and position, such as two SAE features")
    abl.add_argument("--reverse", action="store_true", help="reverse abliteration: amplify the direction (W + a r r^T W, a = --alpha); "
                     "it scales what the writes already carry along it, so it induces little refusal where harmless prompts carry "
                     "almost none (benchmarks/results/induce_edit_*.md); --induce-bias adds the direction instead")
    abl.add_argument("--induce", action="store_true", help="--reverse plus --shift times the direction added to every token embedding "
                     "(read by every block from the first; large shifts break the model)")
    abl.add_argument("--induce-bias", action="store_true",
                     help="make `featsteer steer --mode add` permanent: add --scale times the mean difference along the chosen direction "
                     "to the residual stream at its hook, at every position, by editing biases (an MLP output bias of the block before "
                     "it when it has one: then the same as the runtime addition; else the attention value biases of the blocks before "
                     "it, e.g. Qwen2). A model without biases (Llama, Mistral, Gemma) is an error")
    abl.add_argument("--induce-template", action="store_true",
                     help="like --induce-bias, but the mean difference is added to the embedding rows of the chat template's own "
                     "tokens (the last token of the template's tail that occurs nowhere else in the prompts, e.g. <|assistant|>): at "
                     "the prompt's end only, never at the generated tokens. Meets the organism's induce target; on Qwen2.5 it falls short "
                     "(benchmarks/results/induce_template_qwen.md), where --induce-bias does better")
    abl.add_argument("--scale", type=_scale_or_auto, metavar="S|auto",
                     help="--induce-bias, --induce-template: multiple of the mean difference to add (default 1), or auto: the smallest of "
                     "0.25, 0.5, 0.75, 1, 1.5, 2 whose coherent refusal of validation harmless prompts the before/after check "
                     "does not read is within 0.05 of the best (as compare picks dim_bias_induce's and dim_template_induce's)")
    abl.add_argument("--bias-decay", type=float, metavar="D",
                     help="--induce-bias through value biases: a bias one block earlier costs D times more in the spread (default 2; "
                     "1 spreads evenly)")
    abl.add_argument("--norm-preserving", action="store_true", help="keep each write column's norm")
    abl.add_argument("--reflect", action="store_true", help="reflect the direction instead of removing it: W - 2 r r^T W at every writer and "
                     "the embedding, so every write's component along it changes sign")
    abl.add_argument("--passes", type=int, default=1, metavar="N",
                     help="iterative refinement: the chosen direction and up to N-1 more, each the harmful-minus-harmless mean "
                     "difference left at its hook once the earlier ones are edited out, all removed (default 1: the direction alone)")
    abl.add_argument("--optimize", type=int, default=0, metavar="STEPS",
                     help="refusal direction optimisation (Wollschlaeger et al. 2025): train the chosen direction STEPS Adam steps so "
                     "that ablating it gives the DIM-ablated model's non-refusing answers to the harmful training prompts and keeps the "
                     "unedited model's harmless answers, then edit with it (default 0: the direction as found)")
    abl.add_argument("--optimize-option", action="append", metavar="KEY=VALUE",
                     help=_OPTIMIZE_OPTION_HELP)
    abl.add_argument("--heads", metavar="SPEC", help="edit only these attention heads' output columns, nothing else: top:N (the N heads "
                     "that write the chosen direction most more on the harmful training prompts) or LAYER:H[,H][;LAYER:H]")
    abl.add_argument("--scope", choices=["global", "per_layer"], default="global",
                     help="per_layer: each block removes the DIM candidate of the stream it writes into (rank-1 methods)")
    abl.add_argument("--alpha", type=float, help="amplification for --reverse/--induce (default 1)")
    abl.add_argument("--shift", type=float, help="embedding shift for --induce, as the stream reads it at hook_embed (a model that "
                     "scales its embeddings, Gemma or Granite, gets the weight change divided by that scale; default 0)")
    abl.add_argument("--search", type=int, default=0, metavar="N", help="run an N-trial multi-objective search (optuna TPE)")
    abl.add_argument("--search-dir", help="where the resumable study, pareto.json and pareto.png go (default OUT-search)")
    abl.add_argument("--search-trial", type=int, metavar="N",
                     help="export this trial of the search (e.g. another point of its Pareto front) instead of the automatic choice; "
                     "with --search no larger than the trials already in --search-dir nothing new runs")
    abl.add_argument("--search-kl", choices=["all", "answered", "response"], default="all",
                     help="the search's KL objective: first-token KL over all proxy harmless prompts, over only those the unedited "
                     "model answers, or the KL along the unedited model's own answers to them (response)")
    abl.add_argument("--search-warm-start", metavar="PARETO_JSON",
                     help="an earlier search's pareto.json (or folder): its Pareto points are the new study's first trials")
    abl.add_argument("--eval-n", type=int, default=32, help="prompts per set for the before/after check (default 32)")
    abl.add_argument("--eval-harmful", metavar="SRC", help="held-out harmful prompts for the before/after check (with --eval-harmless; "
                     "default: the first --eval-n validation prompts, which the selection also reads)")
    abl.add_argument("--eval-harmless", metavar="SRC", help="held-out harmless prompts for the before/after check (with --eval-harmful)")
    abl.add_argument("--max-new-tokens", type=int, default=32, help=_MAX_NEW_HELP)
    abl.set_defaults(run=_cmd_abliterate)

    st = sub.add_parser("steer", help="generate with and without a runtime intervention (a direction or SAE features)")
    add_model_args(st)
    st.add_argument("--directions", help="a folder written by `featsteer directions` (e.g. OUT/chosen)")
    st.add_argument("--sae", metavar="SRC", help="steer SAE features instead: organism | folder of <hook_name>/ SAEs | one SAE folder")
    st.add_argument("--feature", action="append", metavar="ID", help="SAE feature id(s) to edit (repeatable, or comma-separated)")
    st.add_argument("--experts", metavar="SPEC", help="switch mixture-of-experts experts off or on instead: LAYER:E[,E][;LAYER:E] "
                    "(candidates from `featsteer experts`)")
    st.add_argument("--experts-at", choices=["routing", "router_logits"], default="routing",
                    help="with --experts: change the routing weights after the router's choice (default; a switched-off expert's "
                    "share goes to the token's other experts) or the router's logits before it (SteerMoE: the router picks the "
                    "next expert in its place)")
    st.add_argument("--mode", required=True, choices=list(dict.fromkeys(DIRECTION_STEER_MODES + FEATURE_STEER_MODES + EXPERT_STEER_MODES)),
                    help=f"with --directions: {'|'.join(DIRECTION_STEER_MODES)}; with --sae: {'|'.join(FEATURE_STEER_MODES)}; "
                    f"with --experts: {'|'.join(EXPERT_STEER_MODES)}")
    st.add_argument("--prompt", action="append", help="repeat for several prompts")
    st.add_argument("--prompts", metavar="SRC", help="a prompt source (file, builtin:..., organism-corpus:...), after any --prompt")
    st.add_argument("--n", type=int, help="first N prompts of --prompts")
    st.add_argument("--system", help="system prompt of every prompt, steered and plain (as `featsteer eval --system`)")
    st.add_argument("--column", help=_COLUMN_HELP)
    st.add_argument("--hook", help="hook to steer at (default: where the direction was read); with --sae: which SAE")
    st.add_argument("--direction-index", type=int, metavar="I", help="with --directions: steer entry I of the set (0-based, as errors "
                    "list them), for entries that share a hook and position, such as two SAE features")
    st.add_argument("--scale", type=float, help="multiple of the mean difference to add (direction add/conditional; default 1)")
    st.add_argument("--value", type=float, help="projection value for --mode set (default: the mean harmful projection at the steered hook); "
                    "the clamp value, scale factor or amount added for SAE features")
    st.add_argument("--multiple", type=float, help="SAE clamp/add amount as a multiple of each feature's largest activation on the prompts")
    st.add_argument("--positions", choices=["all", "prompt", "generated"], help="tokens that SAE feature edits, --mode add and --mode conditional change: all (default), prompt or generated")
    st.add_argument("--threshold", type=float, help="cosine threshold for --mode conditional (default 0)")
    st.add_argument("--gate", metavar="DIR", help="--mode ablate|add only for the prompts this CAST gate fires on (DIRS/gate from "
                    "`featsteer directions --gate`)")
    st.add_argument("--pool", choices=["mean", "last"], default="mean",
                    help="--mode conditional: compare the direction with the prompt's mean activation (mean, CAST's, default) or its last token's")
    st.add_argument("--alpha", type=float, help="--mode ace: 0 sets every layer's projection to the harmless mean's, 1 to the harmful mean's (default 0)")
    st.add_argument("--angle", type=float, help="--mode angular: degrees from the refusal direction (0 full refusal, 180 against it)")
    st.add_argument("--angle-everywhere", action="store_true",
                    help="--mode angular: turn every activation, not only those with a positive projection on the direction")
    st.add_argument("--angle-at", choices=["layers", "norms"], default="layers",
                    help="--mode angular: turn each layer's residual input (layers, default) or each block's normalised "
                    "attention and MLP inputs, leaving the stream itself alone (norms, the paper's placement)")
    st.add_argument("--ablate-at", choices=list(ABLATE_AT),
                    help="--mode ablate with --directions: remove the direction from every residual write (writes, default: the "
                    "hook form of abliteration), every resid_pre/mid/post (residual), or only from what readers see, the stream "
                    "untouched: each block's attention and MLP inputs (blocks), the unembedding's input (unembedding), or both (readers)")
    st.add_argument("--max-new-tokens", type=int, default=32, help=_MAX_NEW_HELP)
    st.add_argument("--json", help="write the prompts, responses and refusal flags here")
    st.set_defaults(run=_cmd_steer)

    cmp_ = sub.add_parser("compare", help="every method on the same prompts: results.json, report.html, Pareto plot")
    add_direction_args(cmp_)
    cmp_.add_argument("--layers", metavar="LIST", help=_SELECT_LAYERS_HELP)
    for action in cmp_._actions:
        if action.dest in ("harmful", "harmless", "out"):
            action.required = False
    cmp_.add_argument("--methods", help="comma-separated subset (see --list)")
    cmp_.add_argument("--list", action="store_true", help="list the available methods")
    cmp_.add_argument("--eval-harmful", help="held-out harmful prompts (default: last quarter of --harmful)")
    cmp_.add_argument("--eval-harmless", help="held-out harmless prompts (default: last quarter of --harmless)")
    cmp_.add_argument("--alarming", help="harmless-but-alarming prompts for the over-refusal rate")
    cmp_.add_argument("--eval-n", type=int, help="first N prompts of each evaluation set")
    cmp_.add_argument("--max-new-tokens", type=int, default=32, help=_MAX_NEW_HELP)
    cmp_.add_argument("--sae", metavar="SRC", help="SAEs for the sae_* methods: organism | folder of <hook_name>/ SAE folders | one SAE folder")
    cmp_.add_argument("--sae-top-k", type=int, metavar="K",
                      help="features the top-k SAE methods use (default: picked on the validation prompts from 1, 2, 4, 8, 16)")
    cmp_.add_argument("--sae-clamp-multiple", type=float, metavar="M",
                      help="sae_clamp_hook's clamp value, a multiple (<= 0) of each feature's harmful maximum (default: picked from 0, -0.5, -1, -2)")
    cmp_.add_argument("--sae-induce-multiple", type=float, metavar="M",
                      help="sae_topk_induce's clamp value, a multiple (> 0) of each feature's harmful maximum (default: picked from 0.5, 1, 2)")
    cmp_.add_argument("--ace-alpha", type=float, metavar="A",
                      help="dim_ace_hook's point on the harmless (0) to harmful (1) mean line, below 1 (default: picked from 0, -0.25, -0.5)")
    cmp_.add_argument("--ace-induce-alpha", type=float, metavar="A",
                      help="dim_ace_induce's point on that line, above 0 (default: picked from 0.5, 0.75, 1, 1.5)")
    cmp_.add_argument("--angle", type=float, metavar="DEG",
                      help="dim_angular_hook's and dim_angular_norms_hook's angle from the refusal direction "
                      "(default: picked from 60, 75, 90, 120, 150, 180)")
    cmp_.add_argument("--angle-everywhere", action="store_true",
                      help="dim_angular_hook and dim_angular_norms_hook turn every activation, not only those leaning towards refusal")
    cmp_.add_argument("--n-pick", type=int, metavar="N", help="validation prompts per set the setting picks read (SAE k and clamp, "
                      "ACE alpha, angle, induce scale; default --n-select, as many as the direction selection)")
    cmp_.add_argument("--baseline", help="the method every other is paired against on the same prompts (McNemar's exact test of "
                      "the refusal verdicts, a bootstrap interval of the KL difference; default dim_abliteration, else none)")
    cmp_.add_argument("--pick-tolerance", type=float, default=0.05, metavar="T",
                      help="a setting picked on the validation prompts may refuse up to T more (jailbreaks) or less (induce) "
                      "than the best one if it is gentler (default 0.05; 0 takes only settings level with the best)")
    cmp_.add_argument("--pick-kl", choices=("first", "response"), default="first",
                      help="the KL the jailbreak picks (ACE alpha, angle, SAE k and clamp) weigh settings by: first-token (default) or "
                      "along the unedited model's own validation answers, which does not favour a setting that keeps the first token")
    cmp_.add_argument("--optimize-steps", type=int, default=24, metavar="N",
                      help="dim_optimized_abliteration and dim_optimized_conditional_ablation_hook (one training run): Adam steps of "
                      "refusal direction optimisation from the DIM direction; the direction after 0, N/4, N/2, 3N/4 and N steps is "
                      "picked from on the validation prompts (default 24)")
    cmp_.add_argument("--optimize-option", action="append", metavar="KEY=VALUE",
                      help=_OPTIMIZE_OPTION_HELP)
    cmp_.add_argument("--pick-max-nll-rise", type=_nats_or_off, metavar="NATS|off",
                      help="coherence bound for the jailbreak picks: a setting whose validation harmless answers cost the unedited "
                      "model more than NATS nats per token above its own answers counts as answering nothing (default 0.5; off: no bound)")
    add_judge_args(cmp_, "adds each method's judged refusal rates, agreement with the markers and a paired test against the baseline")
    cmp_.set_defaults(run=_cmd_compare)

    ex = sub.add_parser("experts", help="mixture-of-experts models: which experts the router picks more often on harmful prompts")
    add_model_args(ex)
    ex.add_argument("--harmful", required=True, help="file, builtin:harmful[:split], or hf:NAME")
    ex.add_argument("--harmless", required=True, help="file, builtin:harmless[:split], or hf:NAME")
    ex.add_argument("--n", type=int, help="use the first N prompts of each set")
    ex.add_argument("--positions", default="all", help="prompt tokens read: all (default), all:N, last, post_instruction, instruction_end")
    ex.add_argument("--top", type=int, default=10, help="experts listed toward each side")
    ex.add_argument("--batch-size", type=int, default=16, help=_BATCH_HELP)
    ex.add_argument("--column", help=_COLUMN_HELP)
    ex.add_argument("--system", help="system prompt of every prompt (as `featsteer eval --system`)")
    ex.add_argument("--json", help="write the rates of every expert and the top lists here")
    ex.set_defaults(run=_cmd_experts)

    pr = sub.add_parser("probe", help="probe sweep per layer and the predict-control report")
    add_model_args(pr)
    pr.add_argument("--harmful", required=True, help="file, builtin:harmful[:split], or hf:NAME")
    pr.add_argument("--harmless", required=True, help="file, builtin:harmless[:split], or hf:NAME")
    pr.add_argument("--out", required=True, help="folder for report.html, sweep.png, sweep.md and results.json")
    pr.add_argument("--positions", default="last", help="last (default) | mean_last:K | post_instruction | instruction_end")
    pr.add_argument("--n", type=int, help="use the first N prompts of each set")
    pr.add_argument("--n-effect", type=int, default=32, help="test prompts per set for steering effects")
    pr.add_argument("--layers", metavar="LIST", help="sweep only these layers, e.g. 4-12 or 4,8,12 (default: every layer)")
    pr.add_argument("--control", metavar="SPEC",
                    help="control task of selectivity: first-words:N or length:W (labels a random function of the instruction's "
                    "first N words / word count in buckets of W, which a probe reading phrasing can learn) or permutation (the "
                    "permutation null); default first-words:1")
    pr.add_argument("--batch-size", type=int, default=16, help=_BATCH_HELP)
    pr.add_argument("--column", help=_COLUMN_HELP)
    pr.add_argument("--system", help="system prompt of every prompt, in the captures and the steering effects (as `featsteer eval --system`)")
    pr.add_argument("--sae", help="also compare each SAE's top feature: organism or a folder of <hook_name>/ SAEs (any residual "
                    "hook or attn.hook_z; each joins at the first resid_pre after it)")
    pr.set_defaults(run=_cmd_probe)

    rf = sub.add_parser("rank-features", help="rank SAE features on harmful vs harmless prompts: report.html, features.csv/json")
    add_model_args(rf)
    rf.add_argument("--sae", required=True, help="organism | folder of <hook_name>/ SAE folders | one sae_lens SAE folder | release:sae_id")
    rf.add_argument("--harmful", required=True, help="file, builtin:harmful[:split], or hf:NAME")
    rf.add_argument("--harmless", required=True, help="file, builtin:harmless[:split], or hf:NAME")
    rf.add_argument("--out", required=True, help="folder for report.html, features.csv and features.json")
    rf.add_argument("--top", type=int, default=20, help="features described in the report and printed")
    rf.add_argument("--by", default="composite", help="ranking metric: composite | differential | cohens_d | auroc | ... (abs_<name>)")
    rf.add_argument("--positions", default="last", help="last | mean_last:K | post_instruction | instruction_end | all (rows pooled)")
    rf.add_argument("--n", type=int, help="use the first N prompts of each set")
    rf.add_argument("--normalise", "--normalize", dest="normalise", action="store_true",
                    help="divide magnitude scores by each feature's max activation")
    rf.add_argument("--units", choices=("activation", "residual"), default="activation",
                    help="magnitude scores in each feature's activation units (default) or in residual units: activation x "
                         "decoder-row norm, how far the feature moves the stream")
    rf.add_argument("--batch-size", type=int, default=16, help=_BATCH_HELP)
    rf.add_argument("--column", help="column for csv/json/parquet prompt files")
    rf.add_argument("--system", help="system prompt of every prompt (as `featsteer eval --system`)")
    rf.set_defaults(run=_cmd_rank_features)

    lab = sub.add_parser("label", help="read a run's responses and label refusals by hand: hand counts beside the markers'")
    lab.add_argument("responses", metavar="RUN", help="a featsteer eval --json output, or compare's responses.json (or its output folder)")
    lab.add_argument("--labels", help="the labels file, created if missing (default: RUN.labels.json beside the run, "
                     "RUN.harmless.labels.json for --set harmless)")
    lab.add_argument("--method", help="whose responses: a compare run holds one set per method (an eval run has one, eval)")
    lab.add_argument("--set", default="harmful", choices=("harmful", "harmless"), help="which prompts' responses (default harmful)")
    how = lab.add_mutually_exclusive_group()
    how.add_argument("--lines", metavar="FILE", help="add the labels in FILE, lines 'INDEX r|a[?] [REASON]', instead of asking")
    how.add_argument("--show", action="store_true", help="print the unlabelled responses as JSON lines (to label in an editor)")
    how.add_argument("--summary", action="store_true", help="only print the hand counts against the markers")
    lab.add_argument("--blind", action="store_true", help="label every method's responses (or --method's) in one shuffled order, "
                     "with no method name or marker verdict shown, so the labels cannot favour a method")
    lab.add_argument("--seed", type=int, default=0, help="the --blind shuffle's seed (default 0)")
    lab.add_argument("--baseline", metavar="METHOD", help="the method the other fully labelled methods' hand counts are paired "
                     "with in the summary (McNemar; default dim_abliteration, else the first fully labelled)")
    lab.set_defaults(run=_cmd_label)

    demo = sub.add_parser("demo", help="the full pipeline on the embedded organism")
    add_model_args(demo)
    demo.add_argument("--out", help="run folder (default runs/<timestamp>)")
    demo.add_argument("--n", type=int, default=64, help="prompts per set for the behaviour check")
    demo.add_argument("--max-new-tokens", type=int, default=32, help=_MAX_NEW_HELP)
    demo.add_argument("--quick", action="store_true", help="behaviour and DIM only (skip compare and probes)")
    demo.set_defaults(run=_cmd_demo)
    for command in sub.choices.values():  # -v also after the command name (`featsteer eval ... -v`)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    return parser


class _ReaderGone:
    """Standard output that, once its reader has gone (`featsteer eval ... --json out.json | head`), drops what is still
    printed instead of raising: the command then finishes what it writes to disk rather than stopping at a print."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.gone = True
        with contextlib.suppress(OSError, ValueError, AttributeError):  # so the interpreter's last flush has nowhere to fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `featsteer` console script."""
    stdout = sys.stdout
    sys.stdout = wrapped = _ReaderGone(stdout)
    try:
        return _main(argv)
    finally:
        if sys.stdout is wrapped:  # (the BrokenPipeError fallback below leaves os.devnull in its place: keep that)
            sys.stdout = stdout


def _check_judge_options(args: argparse.Namespace) -> None:
    """--judge-threshold and --judge-label say how --judge decides: without it they would be ignored."""
    for flag, dest in (("--judge-threshold", "judge_threshold"), ("--judge-label", "judge_label")):
        if getattr(args, dest, None) is not None and not getattr(args, "judge", None):
            raise FeatsteerError(f"{flag} sets how --judge decides: add --judge SPEC or drop {flag}")


def _check_system(args: argparse.Namespace) -> None:
    """A blank --system would be a system turn of spaces (" ") or silently none (""), and --system with --raw silently
    nothing (the system prompt lives in the chat template): refused before a model loads."""
    from featsteer.models.chat import check_system

    system = check_system(getattr(args, "system", None))
    if system is not None and getattr(args, "raw", False):
        raise FeatsteerError("--system goes into the chat template, which --raw leaves out: drop --system or --raw")


_PROMPT_SOURCES = ("prompts", "harmful", "harmless", "alarming", "val_harmful", "val_harmless", "eval_harmful", "eval_harmless")
"""The dests of every prompt-source option, the sources `--column` can apply to."""


def _check_column(args: argparse.Namespace) -> None:
    """--column picks a column of the table files among the sources: with none of them it would be ignored."""
    from featsteer.datasets import takes_column

    if getattr(args, "column", None) is None:
        return
    sources = [source for source in (getattr(args, dest, None) for dest in _PROMPT_SOURCES) if source]
    if sources and not any(takes_column(source) for source in sources):
        raise FeatsteerError(f"--column {args.column} picks a column of a csv/json/jsonl/parquet file or hf: dataset, and no prompt "
                             f"source here is one ({', '.join(sources)}): drop --column")


def _check_output_paths(args: argparse.Namespace) -> None:
    """Output paths that cannot be written, or that lie inside the featsteer package, fail here, before a model is
    loaded, not after the work is done."""
    from featsteer.files import check_output_file, check_output_folder

    for dest, flag in (("out", "--out"), ("search_dir", "--search-dir")):
        if getattr(args, dest, None):
            _check_outside_package(getattr(args, dest), flag)
            check_output_folder(getattr(args, dest), flag)
    for dest, flag in (("json", "--json"), ("labels", "--labels")):
        if getattr(args, dest, None):
            _check_outside_package(getattr(args, dest), flag)
            check_output_file(getattr(args, dest), flag)


def _check_outside_package(path: str, flag: str) -> None:
    """An output inside the installed package would mix a run's files (an exported model's gigabytes) into featsteer's
    own, where the next build or install would ship them."""
    package = Path(__file__).resolve().parent
    if Path(path).expanduser().resolve().is_relative_to(package):
        raise FeatsteerError(f"{flag} {path} is inside the featsteer package ({package}): write outputs elsewhere, e.g. runs/")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # scikit-learn's solver notices drown the tables; -v shows them
        warnings.filterwarnings("ignore", module="sklearn")
    try:
        if not args.verbose:
            from featsteer.models.loading import hide_weight_loading_bar

            hide_weight_loading_bar()
        _check_output_paths(args)
        _check_judge_options(args)
        _check_system(args)
        _check_column(args)
        return args.run(args)
    except FeatsteerError as error:
        print(f"featsteer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featsteer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `featsteer compare --list | head`: the reader left; stop quietly, as a Unix tool does
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes stdout at exit
        return 0
    except OSError as error:  # a path the system refused (no such folder, permission, disk full): one line, not a traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"featsteer: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
