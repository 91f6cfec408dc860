"""``infinitevl convert`` and ``infinitevl export``.

    infinitevl convert --from-hf DIR --out RUN_DIR [--student] [--param-dtype float32] [--overwrite]
    infinitevl export --checkpoint RUN_DIR [--step N] --out DIR [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import re
import time

from infinitevl_jax.models.config import DTYPES

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
               "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as transformers uses them; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 5GB, 500MB, 2GiB, 1000000)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive; got {text!r}")
    return size


def _summary(model) -> str:
    from infinitevl_jax.models.layers import parameter_count

    dec = model.cfg.decoder
    kinds = {t: dec.layer_types.count(t) for t in dict.fromkeys(dec.layer_types)}
    count = parameter_count(model)
    size = f"{count / 1e9:.3f} B" if count >= 10 ** 8 else f"{count / 1e6:.3f} M"
    return (f"{size} parameters, {dec.num_layers} decoder layers "
            f"({', '.join(f'{n} {t}' for t, n in kinds.items())})"
            + ("" if model.cfg.vision is None else f", {model.cfg.vision.depth}-block vision tower"))


def cmd_convert(args, overrides) -> int:
    from infinitevl_jax.convert.pretrained import load_pretrained, save_run
    from infinitevl_jax.convert.student import student_from_teacher

    start = time.perf_counter()
    model = load_pretrained(args.from_hf, dtype=args.dtype, param_dtype=args.param_dtype)
    print(f"loaded {args.from_hf}: {_summary(model)} in {time.perf_counter() - start:.1f} s")
    if args.student:
        model = student_from_teacher(model, seed=args.seed)
        print(f"student (mimic init, seed {args.seed}): {_summary(model)}")
    save_run(model, args.out, source_dir=args.from_hf, overwrite=args.overwrite,
             meta={"source": args.from_hf, "student": args.student, "seed": args.seed})
    print(f"wrote run directory {args.out} (step 0) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args, overrides) -> int:
    from infinitevl_jax.convert.export import export_pytorch
    from infinitevl_jax.convert.pretrained import load_pretrained

    start = time.perf_counter()
    model = load_pretrained(args.checkpoint, step=args.step)
    print(f"loaded {args.checkpoint}" + ("" if args.step is None else f" step {args.step}") + f": {_summary(model)}")
    files = export_pytorch(model, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                           source_dir=args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {', '.join(files)}")
    return 0


def register(sub) -> None:
    """Adds the ``convert`` and ``export`` subcommands to the ``infinitevl`` parser."""
    dtypes = list(DTYPES)
    convert = sub.add_parser("convert", help="import a Hugging Face Qwen2.5-VL / InfiniteVL checkpoint as a run "
                                             "directory (optionally as a mimic-initialised InfiniteVL student)")
    convert.add_argument("--from-hf", required=True, metavar="DIR",
                         help="checkpoint folder: config.json + model.safetensors (or shards + index)")
    convert.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    convert.add_argument("--student", action="store_true",
                         help="build the InfiniteVL student of a full-attention teacher: SWA at layers 0, 4, ..., "
                              "Gated DeltaNet (mimic init) elsewhere")
    convert.add_argument("--seed", type=int, default=0, help="seed of the student's GDN projections")
    convert.add_argument("--dtype", choices=dtypes, default=None, help="compute dtype (default: bfloat16)")
    convert.add_argument("--param-dtype", choices=dtypes, default=None,
                         help="stored parameter dtype (default: float32 master weights)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    convert.set_defaults(run=cmd_convert)

    export = sub.add_parser("export", help="write a run directory's weights as a PyTorch checkpoint in the "
                                           "official InfiniteVL layout (safetensors + config.json)")
    export.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                        help="run directory (or a Hugging Face checkpoint folder, to re-export it)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    export.add_argument("--dtype", choices=dtypes, default="bfloat16", help="tensor dtype in the files")
    export.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors file before sharding with an index (default 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing DIR (after writing)")
    export.set_defaults(run=cmd_export)
