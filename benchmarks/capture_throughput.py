"""Throughput and memory of featsteer activation capture against a plain forward and TransformerLens.

Capture is featsteer's hot path: every direction, probe and SAE starts from it. This benchmark checks
the two promises the capture module makes - the forward pass stops right after the deepest requested
hook (no later layers, no unembedding) and hooks add almost nothing on top of the forward - and compares
with TransformerLens `run_with_cache` on the same weights. It also checks that capturing last-token
activations of many prompts keeps peak memory near the size of the result.

Model: GPT-2 small shape (12 layers, d_model 768, 12 heads, vocab 50257) built from its config with
random weights, float32, eval mode, `attn_implementation="eager"` (the same softmax(QK^T)V computation
TransformerLens runs, so the comparison measures the frameworks and not the attention kernel). Input:
16 prompts x 64 byte-level tokens, no padding.

Method: 2 warm-up rounds, then N timed rounds (median and IQR of `time.perf_counter`), configurations
interleaved round-robin (with the starting configuration rotated each round) so that load from other
processes hits them all alike; `torch.set_num_threads(2)` (`--threads`). featsteer is timed from text (its
tokenisation is included); the plain forward and TransformerLens are timed on the already-tokenised
batch. Peak memory is measured in a fresh subprocess from /proc/self/status (VmHWM after resetting it),
after one 16-prompt warm-up capture whose own (cold, one-time) peak is reported separately.

Usage:
    python benchmarks/capture_throughput.py [--iterations N] [--quick] [--output-dir DIR] [--threads N]
    python benchmarks/capture_throughput.py --memory-only [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

N_LAYERS = 12
D_MODEL = 768
VOCAB_SIZE = 50257
BATCH_SIZE = 16
SEQ_LEN = 64
N_THREADS = 2
WARMUP_ROUNDS = 2
ATTN_IMPLEMENTATION = "eager"
MID_LAYER = 6
LOAD_LIMIT = 1.5
LOAD_WAIT_S = 60.0
SEED = 0

CASE_MID = "a_layer6_resid_pre"
CASE_ALL = "b_all_layers_resid_pre_last"
PLAIN = "hf_plain_forward"
CASE_TITLES = {
    CASE_MID: f"(a) `blocks.{MID_LAYER}.hook_resid_pre`",
    CASE_ALL: f"(b) last-token `resid_pre` at all {N_LAYERS} layers",
}


@dataclass(frozen=True)
class Config:
    """One timed configuration."""

    key: str
    """Unique id of the configuration."""
    cases: tuple[str, ...]
    """Cases whose table it belongs to (the plain forward serves both)."""
    method: str
    """Label shown in the tables."""
    run: Callable[[], object]
    """One iteration: a whole batch of 16 prompts."""


def seed_everything(seed: int) -> random.Random:
    """Seed torch and return the one Python generator the benchmark uses."""
    torch.manual_seed(seed)
    return random.Random(seed)


def make_prompts(n_prompts: int, rng: random.Random) -> list[str]:
    """`n_prompts` distinct ASCII strings of exactly `SEQ_LEN` characters (= tokens with the byte tokenizer)."""
    alphabet = string.ascii_letters + string.digits + " .,"
    return ["".join(rng.choice(alphabet) for _ in range(SEQ_LEN)) for _ in range(n_prompts)]


def build_model(tokenizer_dir: str):
    """The GPT-2-small-sized random model and its featsteer adapter; returns `(hf_model, adapter, tokenizer)`."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from featsteer.models import load_model
    from featsteer.testing import byte_tokenizer, saved_tokenizer

    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=12, n_positions=1024, vocab_size=VOCAB_SIZE)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
    )
    model = model.eval()
    tokenizer = saved_tokenizer(byte_tokenizer(), tokenizer_dir)
    return model, load_model(model, tokenizer=tokenizer), tokenizer


def wait_for_quiet_machine() -> dict:
    """Wait up to `LOAD_WAIT_S` seconds for the 1-minute load average to drop below `LOAD_LIMIT`."""
    start_load = os.getloadavg()
    waited = 0.0
    if start_load[0] > LOAD_LIMIT:
        print(
            f"1-minute load average is {start_load[0]:.2f} (> {LOAD_LIMIT}): waiting up to {LOAD_WAIT_S:.0f} s"
        )
        while os.getloadavg()[0] > LOAD_LIMIT and waited < LOAD_WAIT_S:
            time.sleep(5.0)
            waited += 5.0
    load = os.getloadavg()
    busy = load[0] > LOAD_LIMIT
    if busy:
        print(f"load average still {load[0]:.2f} after {waited:.0f} s: timings are taken on a busy machine")
    return {"at_start": list(start_load), "waited_s": waited, "before_timing": list(load), "busy": busy}


def check_same_activations(adapter, hooked, prompts: list[str], tokens: Tensor) -> float:
    """Make sure featsteer and TransformerLens compute the same thing; returns the max abs difference.

    Raises:
        RuntimeError: when the last-token residuals differ by more than 1e-3.
    """
    from featsteer.activations import capture

    names = adapter.hook_names()
    ours = capture(adapter, prompts, names, chat=False, progress=False).activations
    with torch.inference_mode():
        _, cache = hooked.run_with_cache(tokens, names_filter=names)
    theirs = torch.stack([cache[name][:, -1, :] for name in names], 1)
    difference = float((ours - theirs).abs().max())
    if difference > 1e-3:
        raise RuntimeError(
            f"featsteer and TransformerLens activations differ by {difference}: not the same model"
        )
    return difference


def make_configs(model, adapter, hooked, prompts: list[str], tokens: Tensor, mask: Tensor) -> list[Config]:
    """Every timed configuration of both cases."""
    from featsteer.activations import capture

    mid_hook = f"blocks.{MID_LAYER}.hook_resid_pre"
    all_hooks = adapter.hook_names()

    def plain() -> object:
        with torch.inference_mode():
            return model(input_ids=tokens, attention_mask=mask)

    def featsteer(hooks, positions: str) -> Callable[[], object]:
        return lambda: capture(
            adapter, prompts, hooks, positions=positions, batch_size=BATCH_SIZE, chat=False, progress=False
        )

    def lens(hooks: list[str], stop_at_layer: int | None) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return hooked.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop_at_layer)

        return run

    return [
        Config(PLAIN, (CASE_MID, CASE_ALL), "HF plain forward (full logits)", plain),
        Config(
            "fs_mid_last", (CASE_MID,), 'featsteer capture, positions="last"', featsteer(mid_hook, "last")
        ),
        Config("fs_mid_all", (CASE_MID,), 'featsteer capture, positions="all"', featsteer(mid_hook, "all")),
        Config("tl_mid", (CASE_MID,), "TL run_with_cache (names_filter)", lens([mid_hook], None)),
        Config(
            "tl_mid_stop",
            (CASE_MID,),
            f"extra: TL run_with_cache + stop_at_layer={MID_LAYER + 1}",
            lens([mid_hook], MID_LAYER + 1),
        ),
        Config(
            "fs_all_last", (CASE_ALL,), 'featsteer capture, positions="last"', featsteer(all_hooks, "last")
        ),
        Config("tl_all", (CASE_ALL,), "TL run_with_cache (names_filter)", lens(all_hooks, None)),
        Config(
            "tl_all_stop",
            (CASE_ALL,),
            f"extra: TL run_with_cache + stop_at_layer={N_LAYERS}",
            lens(all_hooks, N_LAYERS),
        ),
    ]


def time_round_robin(configs: list[Config], iterations: int) -> dict[str, list[float]]:
    """Run `WARMUP_ROUNDS` untimed and `iterations` timed rounds, one call of every configuration per round."""
    times: dict[str, list[float]] = {config.key: [] for config in configs}
    for round_index in range(WARMUP_ROUNDS + iterations):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            start = time.perf_counter()
            config.run()
            elapsed = time.perf_counter() - start
            if round_index >= WARMUP_ROUNDS:
                times[config.key].append(elapsed)
        label = "warm-up" if round_index < WARMUP_ROUNDS else "timed"
        print(
            f"  round {round_index + 1}/{WARMUP_ROUNDS + iterations} ({label}) done, load {os.getloadavg()[0]:.2f}"
        )
    return times


def summarise(configs: list[Config], times: dict[str, list[float]]) -> list[dict]:
    """One record per (case, configuration) with median, IQR, tokens/s and the ratio to the plain forward."""
    plain_median = statistics.median(times[PLAIN])
    records = []
    for config in configs:
        samples = times[config.key]
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4, method="inclusive")
        for case in config.cases:
            records.append(
                {
                    "case": case,
                    "method": config.method,
                    "key": config.key,
                    "median_s": median,
                    "tokens_per_s": BATCH_SIZE * SEQ_LEN / median,
                    "iqr_s": quartiles[2] - quartiles[0],
                    "ratio_vs_plain": median / plain_median,
                    "samples_s": samples,
                }
            )
    return records


def evaluate_targets(records: list[dict], memory: dict) -> list[dict]:
    """The issue's targets, each with the measured value and PASS/FAIL."""
    median = {record["key"]: record["median_s"] for record in records}

    def target(name: str, value: float, bound: str, passed: bool) -> dict:
        return {"name": name, "value": round(value, 4), "target": bound, "pass": bool(passed)}

    overhead = median["fs_all_last"] / median[PLAIN] - 1.0
    return [
        target("(b) all-layer capture: extra time over plain forward", overhead, "<= 0.05", overhead <= 0.05),
        target(
            '(a) layer-6 capture time / plain forward (positions="last")',
            median["fs_mid_last"] / median[PLAIN],
            "<= 0.6",
            median["fs_mid_last"] / median[PLAIN] <= 0.6,
        ),
        target(
            '(a) layer-6 capture time / plain forward (positions="all")',
            median["fs_mid_all"] / median[PLAIN],
            "<= 0.6",
            median["fs_mid_all"] / median[PLAIN] <= 0.6,
        ),
        target(
            '(a) speed-up vs TL run_with_cache (positions="last")',
            median["tl_mid"] / median["fs_mid_last"],
            ">= 2.0",
            median["tl_mid"] / median["fs_mid_last"] >= 2.0,
        ),
        target(
            '(a) speed-up vs TL run_with_cache (positions="all")',
            median["tl_mid"] / median["fs_mid_all"],
            ">= 2.0",
            median["tl_mid"] / median["fs_mid_all"] >= 2.0,
        ),
        target(
            "(b) speed-up vs TL run_with_cache",
            median["tl_all"] / median["fs_all_last"],
            ">= 1.15",
            median["tl_all"] / median["fs_all_last"] >= 1.15,
        ),
        target(
            f"memory: peak additional / result size ({memory['n_prompts']} prompts)",
            memory["ratio"],
            "< 2.0",
            memory["ratio"] < 2.0,
        ),
    ]


# ---- memory (runs in a fresh subprocess) ------------------------------------------------------------


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS; return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def _peak_additional(run: Callable[[], object]) -> int:
    """Peak RSS above the current RSS while `run()` executes, in bytes."""
    baseline = _reset_peak_rss()
    run()
    return _status_bytes("VmHWM") - baseline


def _pinned_forward(adapter, tokens, stop_at: str) -> None:
    """The bare early-stopped forward under the allocator setting capture runs its forwards with (outside a capture
    glibc's mmap threshold is not pinned: `featsteer.activations.heap`)."""
    from featsteer.activations.heap import fragmentation_limited

    with fragmentation_limited():
        adapter.run(tokens, stop_at=stop_at)


def memory_worker(n_prompts: int, threads: int = N_THREADS) -> dict:
    """Peak additional RSS of capturing last-token `resid_pre` at every layer for `n_prompts` prompts.

    In a fresh process with the model loaded: first one 16-prompt capture of other prompts, measured on
    its own (the cold first call: torch's lazily initialised kernels and allocator pools, paid once per
    process by any forward pass, captured or not); then the peak is reset and the `n_prompts` capture is
    measured (the target: what capturing costs beyond the result). Diagnostic readings follow on the warm
    process: one 16-prompt capture, and the bare early-stopped forward of the same batch, 3 times each.
    """
    from featsteer.activations import capture

    torch.set_num_threads(threads)
    rng = seed_everything(SEED)
    prompts = make_prompts(n_prompts + BATCH_SIZE, rng)
    warmup_prompts, prompts = prompts[:BATCH_SIZE], prompts[BATCH_SIZE:]
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _, adapter, _ = build_model(tokenizer_dir)
        hooks = adapter.hook_names()
        cold_first_batch = _peak_additional(lambda: capture(adapter, warmup_prompts, hooks, chat=False, progress=False))
        baseline = _reset_peak_rss()
        start = time.perf_counter()
        result = capture(adapter, prompts, hooks, batch_size=BATCH_SIZE, chat=False, progress=False)
        elapsed = time.perf_counter() - start
        peak = _status_bytes("VmHWM")
        retained = _status_bytes("VmRSS") - baseline
        first_batch = prompts[:BATCH_SIZE]
        tokens = adapter.tokenize(first_batch, chat=False)
        warm_capture, warm_forward = [], []
        for _ in range(3):
            warm_capture.append(
                _peak_additional(lambda: capture(adapter, first_batch, hooks, chat=False, progress=False))
            )
            warm_forward.append(_peak_additional(lambda: _pinned_forward(adapter, tokens, hooks[-1])))
    result_bytes = n_prompts * N_LAYERS * D_MODEL * 4
    assert result.activations.numel() * result.activations.element_size() == result_bytes
    additional = peak - baseline
    return {
        "n_prompts": n_prompts,
        "torch_threads": threads,
        "hooks": f"blocks.0-{N_LAYERS - 1}.hook_resid_pre, last token",
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "additional_bytes": additional,
        "result_bytes": result_bytes,
        "ratio": additional / result_bytes,
        "retained_after_capture_bytes": retained,
        "capture_s": elapsed,
        "cold_first_batch_bytes": cold_first_batch,
        "diagnostic_warm_16_prompt_capture_bytes": warm_capture,
        "diagnostic_warm_early_stopped_forward_bytes": warm_forward,
    }


def measure_memory(n_prompts: int, threads: int = N_THREADS) -> dict:
    """Run `memory_worker` in a fresh interpreter and return its record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", str(n_prompts), "--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{completed.stderr[-4000:]}")
    record = json.loads(completed.stdout.strip().splitlines()[-1])
    record["measured_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


# ---- reporting --------------------------------------------------------------------------------------


def environment(threads: int = N_THREADS) -> dict:
    """Versions, CPU, thread count and date."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {
        name: importlib.metadata.version(name) for name in ("torch", "transformers", "transformer-lens")
    }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**versions, "python": platform.python_version()},
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }


def _fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def render_markdown(report: dict) -> str:
    """The results as markdown: one table per case, the memory figures and the targets."""
    env, setup, load = report["environment"], report["setup"], report["load"]
    lines = [
        "# featsteer capture throughput",
        "",
        f"{env['date']} - {env['cpu']} ({env['cpu_count']} cores), torch.set_num_threads({env['torch_threads']}), "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"transformer-lens {env['versions']['transformer-lens']}. Mode: {setup['mode']}.",
        "",
        f"Model: {setup['model']}. Batch {BATCH_SIZE} x {SEQ_LEN} tokens. {WARMUP_ROUNDS} warm-up rounds, "
        f"median of {setup['iterations']} interleaved rounds. featsteer is timed from text (tokenisation "
        "included), the others on the tokenised batch. The plain forward is the same measurement in both tables.",
        "",
        f"Load average (1/5/15 min): {_fmt_load(load['at_start'])} at start, {_fmt_load(load['before_timing'])} "
        f"when timing began (after waiting {load['waited_s']:.0f} s), {_fmt_load(load['after'])} at the end "
        f"(includes this benchmark's own {env['torch_threads']} threads).",
    ]
    if load["busy"]:
        lines += [
            "",
            f"**The machine was busy (1-minute load > {LOAD_LIMIT}) when timing began: absolute "
            "figures are slower than on an idle machine; ratios are more trustworthy (interleaved).**",
        ]
    for case, title in CASE_TITLES.items():
        lines += [
            "",
            f"## {title}",
            "",
            "| method | median s | IQR s | tokens/s | time / plain |",
            "|---|---:|---:|---:|---:|",
        ]
        for record in report["results"]:
            if record["case"] == case:
                lines.append(
                    f"| {record['method']} | {record['median_s']:.3f} | {record['iqr_s']:.3f} | "
                    f"{record['tokens_per_s']:.0f} | {record['ratio_vs_plain']:.3f} |"
                )
    memory = report["memory"]
    lines += [
        "",
        "## Memory",
        "",
        f"Measured {memory.get('measured_at', env['date'])}. "
        f"Last-token `resid_pre` at all {N_LAYERS} layers for {memory['n_prompts']} prompts x {SEQ_LEN} tokens, "
        f"fresh subprocess, torch.set_num_threads({memory.get('torch_threads', env['torch_threads'])}), model loaded, "
        "after one 16-prompt capture of other prompts (the cold first call, "
        f"{_fmt_mb(memory.get('cold_first_batch_bytes', 0))} of one-time torch set-up that any forward pass pays): "
        "peak RSS (VmHWM) minus RSS before capture.",
        "",
        "| result size | peak additional | ratio | still held after capture | capture time |",
        "|---:|---:|---:|---:|---:|",
        f"| {_fmt_mb(memory['result_bytes'])} | {_fmt_mb(memory['additional_bytes'])} | {memory['ratio']:.2f} | "
        f"{_fmt_mb(memory['retained_after_capture_bytes'])} | {memory['capture_s']:.1f} s |",
        "",
        "Diagnostic, same process afterwards (warm), peak additional of one batch, 3 repeats: 16-prompt capture "
        f"{_fmt_mb_list(memory['diagnostic_warm_16_prompt_capture_bytes'])}; early-stopped forward of the same "
        f"batch without capture hooks {_fmt_mb_list(memory['diagnostic_warm_early_stopped_forward_bytes'])}.",
        "",
        "## Targets",
        "",
        "| target | measured | bound | result |",
        "|---|---:|---:|---|",
    ]
    for target in report["targets"]:
        lines.append(
            f"| {target['name']} | {target['value']:.3f} | {target['target']} | {'PASS' if target['pass'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def _fmt_mb_list(values: list[int]) -> str:
    return ", ".join(f"{value / 1e6:.0f}" for value in values) + " MB"


def _fmt_load(load: list[float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


# ---- main -------------------------------------------------------------------------------------------


def run_benchmark(iterations: int, memory_prompts: int, mode: str, threads: int = N_THREADS, memory: dict | None = None) -> dict:
    """Build the models, time every configuration, measure memory (unless an earlier `memory` record is
    given); return the full report."""
    from featsteer.testing import hooked_gpt2

    torch.set_num_threads(threads)
    load = wait_for_quiet_machine()
    rng = seed_everything(SEED)
    prompts = make_prompts(BATCH_SIZE, rng)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        model, adapter, tokenizer = build_model(tokenizer_dir)
        hooked = hooked_gpt2(model, tokenizer)
        batch = adapter.tokenize(prompts, chat=False)
        if tuple(batch.input_ids.shape) != (BATCH_SIZE, SEQ_LEN) or not bool(batch.attention_mask.all()):
            raise RuntimeError(
                f"expected an unpadded {BATCH_SIZE}x{SEQ_LEN} batch, got {tuple(batch.input_ids.shape)}"
            )
        max_difference = check_same_activations(adapter, hooked, prompts, batch.input_ids)
        configs = make_configs(model, adapter, hooked, prompts, batch.input_ids, batch.attention_mask)
        print(f"timing {len(configs)} configurations, {WARMUP_ROUNDS} warm-up + {iterations} rounds")
        times = time_round_robin(configs, iterations)
        load["after_timing"] = list(os.getloadavg())
        del model, adapter, hooked
    records = summarise(configs, times)
    if memory is None:
        print(f"measuring memory for {memory_prompts} prompts in a subprocess")
        memory = measure_memory(memory_prompts, threads)
    load["after"] = list(os.getloadavg())
    return {
        "environment": environment(threads),
        "setup": {
            "mode": mode,
            "model": f"GPT-2 small shape ({N_LAYERS} layers, d_model {D_MODEL}, vocab {VOCAB_SIZE}), random init, "
            f"float32, eval, attn_implementation={ATTN_IMPLEMENTATION!r}",
            "batch": [BATCH_SIZE, SEQ_LEN],
            "warmup_rounds": WARMUP_ROUNDS,
            "iterations": iterations,
            "seed": SEED,
            "featsteer_vs_tl_max_abs_difference": max_difference,
        },
        "load": load,
        "results": records,
        "targets": evaluate_targets(records, memory),
        "memory": memory,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iterations", type=int, default=None, help="timed rounds (default 7; 3 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 3 rounds, 200 prompts for the memory case"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where capture.json and capture.md go (default benchmarks/results)",
    )
    parser.add_argument("--threads", type=int, default=N_THREADS,
                        help=f"torch intra-op threads for timing and memory (default {N_THREADS})")
    parser.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true",
                        help="re-measure memory only and update an existing capture.json/md (timings kept)")
    parser.add_argument("--timing-only", action="store_true",
                        help="re-time only and update an existing capture.json/md (memory record kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write `capture.json` and `capture.md`."""
    args = parse_args(argv)
    from featsteer.files import json_text, write_files

    if args.memory_worker is not None:
        print(json.dumps(memory_worker(args.memory_worker, args.threads)))
        return
    if args.memory_only:
        report = json.loads((args.output_dir / "capture.json").read_text())
        report["memory"] = measure_memory(report["memory"]["n_prompts"], args.threads)
        report["targets"] = evaluate_targets(report["results"], report["memory"])
        write_files(args.output_dir, {"capture.json": json_text(report, indent=2) + "\n", "capture.md": render_markdown(report)})
        print(render_markdown(report))
        return
    iterations = args.iterations or (3 if args.quick else 7)
    if iterations < 2:
        raise SystemExit("--iterations must be at least 2 (the IQR needs two samples)")
    started = time.perf_counter()
    kept_memory = json.loads((args.output_dir / "capture.json").read_text())["memory"] if args.timing_only else None
    report = run_benchmark(iterations, 200 if args.quick else 2000, "quick" if args.quick else "full", args.threads, kept_memory)
    report["wall_time_s"] = time.perf_counter() - started
    markdown = render_markdown(report)
    write_files(args.output_dir, {"capture.json": json_text(report, indent=2) + "\n", "capture.md": markdown})
    print(markdown)
    print(f"wrote {args.output_dir / 'capture.json'} and capture.md in {report['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
