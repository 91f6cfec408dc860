"""Training throughput and MFU: the stage-2 instruction-SFT step of InfiniteVL-4B on all local GPUs.

    python -m benchmarks.train_gpu [--batch 2] [--seq-len 8192] [--steps 10] [--remat nothing_saveable]
                                   [--delta-rule-impl auto] [--out benchmarks/results/train_gpu.json]
    python -m benchmarks.train_gpu --preset tiny --seq-len 256 --steps 2 --out /tmp/x.json   # CPU smoke run

What runs: ``Trainer`` of ``stage_defaults("sft")`` (cross entropy on ``loss_mask`` tokens;
trainable = the 27 GDN mixers + the 9 SWA q/k/v/o, spec section 7.3; AdamW, clipping) over the
``--preset`` model with random weights (ViT included unless ``--no-vision``, frozen and unused:
the batches are text only), float32 master weights and bfloat16 compute, on a mesh
``data=1, fsdp=<all local devices>`` (parameters, optimiser state and batch rows sharded over
fsdp, ZeRO-3 style). Parameters are created by a jitted initialiser whose outputs are already
sharded, so no device ever holds the unsharded model.

Batch: ``--batch`` rows (global; default one per device) of ``--seq-len`` random token ids in the
packed layout of ``data.packing.PackedBatch`` (input_ids, segment_ids, targets, position_ids
``[B, 3, T]``, loss_mask), ``--documents`` documents per row (default 1: a row is one 8K
sequence, which is what the FLOP count assumes), every in-document next token a label. The
same batch is fed every step, so the loss falls (memorisation): a check that it trains. Packed
rows carry segment_ids, so attention runs the blockwise kernel ("auto": cuDNN takes no
segments); ``--no-segment-ids`` drops them for single-document rows (cuDNN flash attention on GPU).

Timing: ``--warmup`` steps (the first compiles; ``first_step_s``), then ``--steps`` steps, each
synchronised (``block_until_ready``); ``step_ms`` is their median. Model FLOPs per token come
from ``infinitevl_jax.train.flops`` (PaLM convention: remat recompute not counted; vision tower
excluded); MFU divides by the dense bf16 peak of the device kind (``peak_flops_per_device``;
none on the CPU). Peak memory: ``peak_bytes_in_use`` of each local device after the run (the
initialisation's transient included), the largest one reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REMAT_CHOICES = ("none", "full", "dots_saveable", "nothing_saveable")
# What fits 4B at 8K tokens per GPU (fsdp 2, one row each): XLA's buffer assignment for the compiled
# step (CPU backend, chunked delta rule, blockwise attention; the GPU's differs, so a ballpark) needs
# per device 11.9 GiB of parameters + optimiser state and temporaries of 68 GiB with
# "nothing_saveable", 283 GiB with "dots_saveable", 696 GiB with "none". Only the first fits an H200.
DEFAULT_REMAT = "nothing_saveable"


def _log(message: str) -> None:
    print(f"[train_gpu] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="infinitevl_4b", help="model preset (tiny: the CPU smoke run)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per row")
    p.add_argument("--batch", type=int, default=None, help="global rows per step (default: one per device)")
    p.add_argument("--microbatches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--documents", type=int, default=1, help="packed documents per row")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--remat", choices=REMAT_CHOICES, default=DEFAULT_REMAT, help="decoder/ViT remat policy")
    p.add_argument("--delta-rule-impl", default="auto", help="gated delta rule impl (auto, pallas, chunked, ...)")
    p.add_argument("--attention-impl", default="auto", help="attention impl (auto, blockwise, dense, cudnn)")
    p.add_argument("--no-segment-ids", action="store_true",
                   help="rows are single documents: drop segment_ids (lets attention use cuDNN flash attention, "
                        "an unpacked run); needs --documents 1")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="constant (no warmup) peak learning rate")
    p.add_argument("--no-vision", action="store_true", help="drop the (frozen, unused) vision tower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/train_gpu.json; "
                                               "the tiny preset: a temporary file)")
    args = p.parse_args(argv)
    for name in ("seq_len", "steps", "microbatches", "documents"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step compiles and must not be timed)")
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    if args.no_segment_ids and args.documents != 1:
        p.error("--no-segment-ids needs --documents 1 (segments would leak into each other)")
    if args.seq_len < 2 * args.documents:
        p.error(f"--seq-len {args.seq_len} is too short for {args.documents} documents of >= 2 tokens")
    return args


def model_config(args):
    """The preset's ``VisionLanguageConfig`` under the SFT stage's precision and ``--remat``,
    with the chosen kernel impls."""
    from infinitevl_jax.config import load_config
    from infinitevl_jax.models.config import VisionLanguageConfig
    from infinitevl_jax.ops import attention, delta_rule
    from infinitevl_jax.train.step import training_model_config

    delta_impls = ("auto", "pallas", *delta_rule.IMPLS)
    if args.delta_rule_impl not in delta_impls:
        raise SystemExit(f"error: --delta-rule-impl {args.delta_rule_impl!r}; choose one of {list(delta_impls)}")
    if args.attention_impl not in attention.IMPLS:
        raise SystemExit(f"error: --attention-impl {args.attention_impl!r}; choose one of {list(attention.IMPLS)}")
    train = train_config(args)
    cfg = VisionLanguageConfig.from_config(load_config(args.preset))
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(
        cfg.decoder, delta_rule_impl=args.delta_rule_impl, attention_impl=args.attention_impl))
    if args.no_vision:
        cfg = dataclasses.replace(cfg, vision=None)
    return training_model_config(cfg, train), train


def train_config(args):
    """``stage_defaults("sft")``: bf16 compute, float32 master weights, ``--remat``, a constant
    learning rate (no warmup, a long cosine) so the first steps already move the weights."""
    from infinitevl_jax.train.step import stage_defaults

    train = stage_defaults("sft")
    train.remat = args.remat
    train.microbatches = args.microbatches
    train.optim.learning_rate = args.learning_rate
    train.optim.warmup_steps = 0
    train.optim.total_steps = max(1000, 10 * (args.warmup + args.steps))
    return train


def synthetic_batch(rows: int, seq_len: int, vocab: int, documents: int = 1, seed: int = 0) -> dict:
    """A packed text batch of random ids (``PackedBatch`` fields, numpy).

    Each row holds ``documents`` segments (ids 1..documents) of near-equal length filling all
    ``seq_len`` tokens; positions restart at 0 per segment (text: equal on the 3 mRoPE axes);
    targets are the next id inside the segment, the segment's last token has none (target 0,
    loss_mask 0). Shapes: ids, segment_ids, targets int32 ``[B, T]``; position_ids int32
    ``[B, 3, T]``; loss_mask float32 ``[B, T]``.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, seq_len)).astype(np.int32)
    bounds = np.linspace(0, seq_len, documents + 1).round().astype(int)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    for d in range(documents):
        seg[bounds[d]:bounds[d + 1]] = d + 1
        pos[bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    has_next = np.append(seg[1:] == seg[:-1], False)
    targets = np.where(has_next[None], np.roll(ids, -1, axis=1), 0).astype(np.int32)
    return dict(input_ids=ids, segment_ids=np.broadcast_to(seg, (rows, seq_len)).copy(),
                position_ids=np.broadcast_to(pos, (rows, 3, seq_len)).copy(), targets=targets,
                loss_mask=np.broadcast_to(has_next.astype(np.float32), (rows, seq_len)).copy())


def unsegmented_inputs(model, batch):
    """``packed_inputs`` without segment_ids (each row one document: the same visibility)."""
    from infinitevl_jax.train.step import packed_inputs

    return packed_inputs(model, batch)._replace(segment_ids=None)


def _peak_bytes(devices) -> list[int | None]:
    out = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 -- some backends do not implement memory_stats
            stats = {}
        out.append(stats.get("peak_bytes_in_use"))
    return out


def run(args) -> dict:
    """Builds, compiles, times; returns the JSON payload (``oom`` set if memory ran out)."""
    import jax
    from flax import nnx

    from benchmarks.common import device_description, is_oom
    from infinitevl_jax.convert.pretrained import random_model
    from infinitevl_jax.train import flops
    from infinitevl_jax.train.sharding import make_mesh
    from infinitevl_jax.train.step import Trainer, shard_batch
    from infinitevl_jax.train.trainable import count_trainable

    devices = jax.local_devices()
    if jax.process_count() != 1:
        raise SystemExit("error: this benchmark is single-host (one process over its local devices)")
    n = len(devices)
    batch_rows = n if args.batch is None else args.batch
    if batch_rows % (n * args.microbatches):
        raise SystemExit(f"error: --batch {batch_rows} must be a multiple of devices x microbatches = "
                         f"{n} x {args.microbatches} (every device holds whole rows of each micro-batch)")
    cfg, train = model_config(args)
    mesh = make_mesh(data=1, fsdp=n)
    settings = dict(preset=args.preset, stage="sft", seq_len=args.seq_len, global_batch=batch_rows,
                    microbatches=args.microbatches, documents_per_row=args.documents,
                    segment_ids=not args.no_segment_ids, remat=args.remat,
                    delta_rule_impl=args.delta_rule_impl, attention_impl=args.attention_impl,
                    vision_tower=cfg.vision is not None, dtype=train.dtype, param_dtype=train.param_dtype,
                    learning_rate=args.learning_rate, warmup_steps=args.warmup, timed_steps=args.steps,
                    mesh=dict(mesh.shape), tokens_per_step=batch_rows * args.seq_len)
    payload = dict(benchmark="train_gpu", device=device_description(), device_kind=devices[0].device_kind,
                   num_devices=n, settings=settings)
    _log(f"{n} x {devices[0].device_kind}; mesh {dict(mesh.shape)}; preset {args.preset}, batch {batch_rows} x "
         f"{args.seq_len} tokens, remat {args.remat}, delta rule {args.delta_rule_impl}")

    start = time.perf_counter()
    _log("initialising sharded parameters ...")
    model = random_model(cfg, seed=args.seed, mesh=mesh)
    inputs = dict(inputs_fn=unsegmented_inputs) if args.no_segment_ids else {}
    trainer = Trainer(model, train, mesh=mesh, **inputs)
    trainable, total = count_trainable(nnx.state(model, nnx.Param), trainer.mask)
    state = trainer.init(model)
    del model  # the state holds its own copy (the step donates it)
    jax.block_until_ready(state)
    payload["build_s"] = time.perf_counter() - start
    payload["params"] = dict(total=total, trainable=trainable)
    _log(f"built in {payload['build_s']:.1f} s: {total:,} parameters, {trainable:,} trainable")

    per_token = flops.train_flops_breakdown(cfg, args.seq_len, trainable_params=trainable)
    payload["flops_per_token"] = per_token
    host = synthetic_batch(batch_rows, args.seq_len, cfg.decoder.vocab_size, args.documents, args.seed)
    batch = shard_batch(host, trainer.mesh)

    losses, times = [], []
    try:
        for i in range(args.warmup + args.steps):
            timed = i >= args.warmup
            if i == 0:
                _log("step 1: compiling and running ...")
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready((state, metrics))
            elapsed = time.perf_counter() - t0
            loss = float(metrics["loss"])
            losses.append(loss)
            if i == 0:
                payload["first_step_s"] = elapsed
            if timed:
                times.append(elapsed)
            if not np.isfinite(loss):
                raise FloatingPointError(f"step {i + 1}: loss is {loss}")
            _log(f"step {i + 1}/{args.warmup + args.steps}{'' if timed else ' (warm-up)'}: "
                 f"{elapsed * 1e3:.1f} ms, loss {loss:.4f}")
    except Exception as error:  # noqa: BLE001 -- only out-of-memory is reported, anything else re-raises
        if not is_oom(error):
            raise
        payload.update(oom=True, error=str(error).splitlines()[0][:500], losses=losses,
                       peak_bytes_per_device=_peak_bytes(devices))
        remat_hint = "" if args.remat in ("nothing_saveable", "full") else "--remat nothing_saveable, "
        _log(f"OUT OF MEMORY after {len(losses)} steps: {payload['error']}\n"
             f"  try {remat_hint}a smaller --batch, more --microbatches, --no-vision or a shorter --seq-len")
        return payload

    step_s = statistics.median(times)
    tokens_per_s = batch_rows * args.seq_len / step_s
    peak = flops.peak_flops_per_device(devices[0])
    peaks = _peak_bytes(devices)
    known = [b for b in peaks if b is not None]
    payload.update(
        oom=False, step_ms=step_s * 1e3, step_ms_mean=statistics.fmean(times) * 1e3,
        step_ms_all=[t * 1e3 for t in times], tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / n,
        model_tflops_per_device=tokens_per_s * per_token["total"] / n / 1e12, peak_flops_per_device=peak,
        mfu=flops.mfu(tokens_per_s, per_token["total"], peak, n), peak_bytes_per_device=peaks,
        peak_gib_per_device=max(known) / 2 ** 30 if known else None, loss_first=losses[0], loss_last=losses[-1],
        losses=losses)
    return payload


def summary_row(payload: dict) -> dict:
    s = payload["settings"]
    row = dict(device=payload["device_kind"], gpus=payload["num_devices"],
               mesh="x".join(f"{k}{v}" for k, v in s["mesh"].items() if v > 1) or "1",
               batch=s["global_batch"], seq_len=s["seq_len"], remat=s["remat"])
    if payload.get("oom"):
        return {**row, "step_ms": "OOM"}
    return {**row, "step_ms": payload["step_ms"], "tokens/s": payload["tokens_per_s"],
            "tokens/s/gpu": payload["tokens_per_s_per_device"],
            "TFLOP/s/gpu": payload["model_tflops_per_device"],
            "MFU": "n/a" if payload["mfu"] is None else payload["mfu"],
            "peak_GiB/gpu": "n/a" if payload["peak_gib_per_device"] is None else payload["peak_gib_per_device"],
            "loss_first": payload["loss_first"], "loss_last": payload["loss_last"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # effective if jax is not started yet
    import jax

    from benchmarks.common import print_table, write_json

    backend = jax.default_backend()
    if backend == "cpu" and args.preset != "tiny":
        raise SystemExit(f"error: preset {args.preset!r} needs GPUs (backend is 'cpu'); "
                         "use --preset tiny for a CPU smoke run")
    payload = run(args)
    row = summary_row(payload)
    print()
    print_table([row], list(row))
    if not payload.get("oom"):
        f = payload["flops_per_token"]
        print(f"\nmodel FLOPs per token: {f['total']:.4g} (forward {f['student_forward']:.4g}, activation grads "
              f"{f['activation_grads']:.4g}, weight grads {f['weight_grads']:.4g}; vision tower excluded)")
    out = args.out or (os.path.join(tempfile.gettempdir(), "train_gpu_tiny.json") if args.preset == "tiny"
                       else "benchmarks/results/train_gpu.json")
    write_json(out, payload)
    if payload.get("oom"):
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
