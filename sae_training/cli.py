"""`featsteer-train-sae`: train sae_lens SAEs on a featsteer model from the command line.

Parses arguments into a `TrainConfig`, runs `train_saes`, and prints one line of metrics per layer.
Every user-facing failure is a `FeatsteerError`, printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from featsteer.errors import FeatsteerError
from featsteer.models.hookpoints import HEAD_KINDS, LAYER_KINDS
from sae_training.architectures import ARCHITECTURES
from sae_training.config import ArchitectureConfig, DataConfig, OptimConfig, TrainConfig

_EXAMPLE = "featsteer-train-sae --model organism --layers all --arch topk --expansion 8 --k 32 --tokens 2000000 --text builtin:harmless --out saes/"


def parse_layers(text: str) -> tuple[int, ...] | None:
    """Parse `--layers`: `all`, a comma list `2,4`, ranges `0-3`, or a mix (`0-2,5`). None means all.

    Raises:
        FeatsteerError: for anything else.
    """
    if text.strip().lower() == "all":
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            span = range(int(first), int(last) + 1) if dash else [int(first)]
            if not span:
                raise ValueError(part)
            layers.extend(span)
    except ValueError:
        raise FeatsteerError(f"bad layer list '{text}': use all, a comma list like 2,4, or a range like 0-3") from None
    if any(layer < 0 for layer in layers):
        raise FeatsteerError(f"bad layer list '{text}': layers are non-negative integers")
    return tuple(sorted(set(layers)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `featsteer-train-sae`."""
    parser = argparse.ArgumentParser(prog="featsteer-train-sae", description="Train sae_lens SAEs on a featsteer model.",
                                     epilog=f"example: {_EXAMPLE}")
    parser.add_argument("--model", required=True, help="organism, tiny:llama, a model directory, a .gguf file or a hub id")
    parser.add_argument("--dtype", default="float32", help="the model's dtype while capturing: float32 (default) | bfloat16 | float16 | auto; "
                        "activations are stored and SAEs trained in float32")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | mps, for the model and the SAE training")
    parser.add_argument("--layers", default="all", help="all, or layers like 2,4 or 0-3 (default: all)")
    parser.add_argument("--hook", default="resid_post", choices=LAYER_KINDS + HEAD_KINDS,
                        help="hook kind to train at (default: resid_post); attn_z trains on blocks.L.attn.hook_z, the attention heads "
                        "side by side (n_heads x d_head per token), as attention-output SAEs do")
    parser.add_argument("--arch", default="topk", help=f"SAE architecture: {', '.join(ARCHITECTURES)} (default: topk)")
    parser.add_argument("--d-sae", type=int, help="number of features (or give --expansion)")
    parser.add_argument("--expansion", type=float, help="number of features as a multiple of the input width, d_model "
                        "(n_heads x d_head for --hook attn_z) (or give --d-sae)")
    parser.add_argument("--k", type=float, help="active features per token for topk/batchtopk (default: 32)")
    parser.add_argument("--sparsity", type=float, help="L1 (standard) or L0 (jumprelu) coefficient")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per SAE (default: 1000000)")
    parser.add_argument("--text", action="append", required=True, help="prompt source, repeatable: builtin:harmless, a .txt/.jsonl/.csv file, hf:NAME, organism-corpus:N")
    parser.add_argument("--no-cycle", action="store_true", help="stop when the text is exhausted instead of cycling over it")
    parser.add_argument("--raw", action="store_true", help="use texts as they are instead of chat-formatting them")
    parser.add_argument("--out", required=True, help="output folder; each SAE goes to OUT/<hook_name>/")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="activations per optimiser step (default: 4096)")
    parser.add_argument("--lr", type=float, help="learning rate (default: 2e-4 / sqrt(d_sae / 16384), as EleutherAI sparsify)")
    parser.add_argument("--eval-prompts", type=int, default=64, help="texts held out for evaluation (default: 64; at most a tenth of the texts)")
    parser.add_argument("--keep-shared-prefix", action="store_true",
                        help="also train on the tokens every text starts with (chat-template head, BOS); skipped by default")
    parser.add_argument("--max-norm-ratio", type=float, default=10.0,
                        help="leave out tokens whose norm exceeds this multiple of the median (attention sinks; default: 10)")
    parser.add_argument("--keep-outliers", action="store_true", help="train on every token, massive activations included")
    parser.add_argument("--activation-cache", help="keep the captured activations here and reuse them, layer by layer, on a re-run "
                        "with the same model, --dtype, text, --raw, --keep-shared-prefix and --tokens (or a larger --tokens once the text "
                        "ran out), to sweep SAE settings or resume an interrupted run; runs may share it; default: a temporary folder")
    parser.add_argument("--work-dir", help="parent folder for the temporary activation store (default: system temp)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed arguments into a validated `TrainConfig`."""
    k = None if args.k is None else (int(args.k) if float(args.k).is_integer() else args.k)
    return TrainConfig(
        data=DataConfig(model=args.model, texts=tuple(args.text), dtype=args.dtype, device=args.device, hook_kind=args.hook, layers=parse_layers(args.layers),
                        tokens=args.tokens, cycle=not args.no_cycle, chat=not args.raw, eval_prompts=args.eval_prompts,
                        work_dir=args.work_dir, activation_cache=args.activation_cache, skip_shared_prefix=not args.keep_shared_prefix,
                        max_norm_ratio=None if args.keep_outliers else args.max_norm_ratio),
        sae=ArchitectureConfig(architecture=args.arch, d_sae=args.d_sae, expansion=args.expansion, k=k, sparsity_coefficient=args.sparsity),
        optim=OptimConfig(lr=args.lr, batch_tokens=args.batch_tokens, seed=args.seed),
        out=args.out,
    )


L0_OVER_K = 1.5
"""An SAE with a `k` whose held-out L0 is above this multiple of it is flagged in the table (a BatchTopK SAE's inference
threshold, an average learnt during training, is still too low after a short run; `metrics.json` has the L0 either way)."""


def _figure(value: float | None) -> str:
    """A 7-wide table cell with three decimals, or `n/a` for a figure that is undefined (NaN in memory, null in a
    skipped layer's `metrics.json`)."""
    return f"{value:>7.3f}" if value is not None and math.isfinite(value) else f"{'n/a':>7}"


def _report(results: dict[str, dict]) -> None:
    """Print one line of metrics per layer; an L0 far above `k` is marked `!` and explained below the table."""
    print(f"{'hook':<28} {'d_sae':>6} {'L0':>6} {'EV':>7} {'CE rec':>7} {'dead':>6} {'tok/s':>9}")
    notes = []
    for hook, m in results.items():
        k = m.get("k")
        unconverged = k is not None and m["l0"] > L0_OVER_K * k
        if unconverged:
            notes.append(f"! {hook}: L0 {m['l0']:.1f} is above {L0_OVER_K:g} x k (k = {k:g}): the {m.get('architecture', 'SAE')} SAE's "
                         "threshold has not converged; train longer (raise --tokens or lower --batch-tokens) before using it")
        print(f"{hook:<28} {m['d_sae']:>6} {m['l0']:>6.1f}{'!' if unconverged else ' '}{_figure(m['explained_variance'])} "
              f"{_figure(m['ce_loss_recovered'])} {m['dead_fraction']:>6.3f} {m['tokens_per_second']:>9.0f}")
    for note in notes:
        print(note)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `featsteer-train-sae` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise FeatsteerError(f"--threads must be a positive integer, got {args.threads}")
            torch.set_num_threads(args.threads)
        config = config_from_args(args)
        from featsteer.files import check_output_folder

        check_output_folder(args.out)
        if args.activation_cache:
            check_output_folder(args.activation_cache, "--activation-cache")
        if args.work_dir and not Path(args.work_dir).expanduser().is_dir():
            raise FeatsteerError(f"--work-dir {args.work_dir} is not a folder: give an existing folder for the temporary activation store")
        if not args.verbose:
            from featsteer.models.loading import hide_weight_loading_bar

            hide_weight_loading_bar()
        from sae_training.train import train_saes

        results = train_saes(config, progress=not args.quiet)
    except FeatsteerError as error:
        print(f"featsteer-train-sae: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featsteer-train-sae: interrupted (finished layers are kept)", file=sys.stderr)
        return 130
    except OSError as error:  # a path the system refused (no such folder, permission, disk full): one line, not a traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"featsteer-train-sae: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    _report(results)
    print(f"saved to {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
