"""The ``eval`` subcommand of ``infinitevl``.

    infinitevl eval (--model DIR | --config PRESET) --data easy_vqa|ocr|PATH.jsonl|PATH.tsv
                    [--split test] [--limit N] [--no-shuffle] [--subset-seed 0] [--batch-size 32]
                    [--max-new-tokens 8] [--tokenizer NAME] --out report.json

Greedy answers to the data set's questions, scored by VQA exact match and ANLS (and the VQAv2
soft score when samples have >= 3 references). Prints a summary table and writes the full report
(every prediction) as JSON; the file appears whole or not at all (written under a temporary name
in the same folder, then renamed). ``--limit N`` takes the first N samples after a shuffle with
``--subset-seed`` (``--no-shuffle``: the first N in file order); for ``ocr`` it is the number of
generated images (default 100).
"""

from __future__ import annotations

import os

from infinitevl_jax.config import list_presets
from infinitevl_jax.train.checkpoint import write_text_atomic


def cmd_eval(args, overrides) -> int:
    from infinitevl_jax.data.pipeline import make_tokenizer
    from infinitevl_jax.evaluate.datasets import load
    from infinitevl_jax.evaluate.vqa import evaluate
    from infinitevl_jax.infer.commands import load_model

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1; got {args.limit}")
    samples = load(args.data, split=args.split, limit=args.limit, seed=None if args.no_shuffle else args.subset_seed)
    if not samples:
        raise ValueError(f"{args.data} holds no samples")
    model, tokenizer = load_model(args, overrides)
    if args.tokenizer is not None:
        tokenizer = make_tokenizer(args.tokenizer)
    source = f"checkpoint {args.model}" if args.model else f"preset {args.config} (random weights, seed {args.seed})"
    print(f"evaluating {source} on {args.data} ({len(samples)} samples, batch {args.batch_size}, "
          f"at most {args.max_new_tokens} new tokens)")
    report = evaluate(model, tokenizer, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      chunk_size=args.chunk_size, desc=os.path.basename(args.data))
    report.meta = {"model": args.model, "config": None if args.model else args.config, "overrides": list(overrides),
                   "data": args.data, "split": args.split if args.data == "easy_vqa" else None, "limit": args.limit,
                   "subset_seed": None if args.no_shuffle else args.subset_seed, "batch_size": args.batch_size,
                   "max_new_tokens": args.max_new_tokens, "tokenizer": args.tokenizer}
    print(report.summary())
    write_text_atomic(args.out, report.to_json())
    print(f"report written to {args.out}")
    return 0


def register(subparsers) -> None:
    """Adds ``eval`` to the ``infinitevl`` command's subparsers."""
    parser = subparsers.add_parser("eval", help="VQA accuracy / ANLS of a checkpoint or preset on a data set")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="checkpoint directory (weights + tokenizer.json)")
    source.add_argument("--config", default="tiny",
                        help=f"preset ({', '.join(list_presets())}) or config .py, random weights (default tiny)")
    parser.add_argument("--data", required=True, help="easy_vqa, ocr (synthetic), a .jsonl or a VLMEvalKit .tsv file")
    parser.add_argument("--split", default="test", help="easy_vqa split (train or test)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate N samples (a seeded, deterministic subset)")
    parser.add_argument("--subset-seed", type=int, default=0, help="shuffle seed of --limit subsets and of ocr images")
    parser.add_argument("--no-shuffle", action="store_true", help="--limit takes the first N samples in file order")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--tokenizer", default=None,
                        help="quickstart, byte, a folder with tokenizer.json or a .json path (default: the "
                             "checkpoint's, or byte for presets)")
    parser.add_argument("--seed", type=int, default=0, help="random-weight init of presets")
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk, tokens")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                        help="weight dtype (default: the checkpoint loader's or the preset's)")
    parser.add_argument("--out", required=True, help="JSON report path (written atomically)")
    parser.set_defaults(run=cmd_eval)
