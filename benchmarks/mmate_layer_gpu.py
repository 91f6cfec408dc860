"""Where an M-MATE layer's time goes: one layer's forward, and its parts, against the teacher's
attention layer, at one context length (batch 1, bf16, random weights, the ``linmu`` preset's
dims: 16 heads of 128, 2 KV heads, hidden 2048).

    python -m benchmarks.mmate_layer_gpu [--context 65536] [--out FILE]
    python -m benchmarks.mmate_layer_gpu --smoke      # tiny dims, any backend

Rows (median ms of jitted calls, ``benchmarks.common.median_ms``):

- ``attention``: the teacher's mixer (full causal attention, ``attention_impl="auto"``: cuDNN on GPU);
- ``mmate``: the whole M-MATE mixer (both branches and the mix) on a prompt whose tokens are all
  one video run (frames of 16 x 16), as in ``linmu_prefill_gpu``;
- ``runs_and_orders``: ``vision_runs`` + the scan and window permutations and window names;
- ``flex_ma``: Flex-MA alone (permutation included); ``ssd_forward``: one ``ssd_scan`` over all
  tokens with the layer's shapes; ``local_swin``: Local-Swin alone;
- ``mlp``: the SwiGLU MLP (the same in both models), for scale.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.common import device_description, median_ms, print_table, write_json
from benchmarks.inference_gpu import build_model


def video_prompt(context: int, grid: int):
    """mRoPE ids ``[3, 1, T]`` and vision mask ``[1, T]`` of one video run of ``context`` tokens."""
    t = np.arange(context)
    frame, row, col = t // (grid * grid), (t // grid) % grid, t % grid
    positions = np.stack([2 * frame, row, col])[:, None].astype(np.int32)
    return positions, np.ones((1, context), bool)


def main(argv=None):
    import jax
    import jax.numpy as jnp

    from infinitevl_jax.models.mmate import backward_segments
    from infinitevl_jax.models.vision_runs import permute, scan_order, vision_runs, window_groups, window_order
    from infinitevl_jax.models.config import mmate_layer_types
    from infinitevl_jax.ops.ssm import ssd_scan

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/mmate_layer_gpu.json")
    args = parser.parse_args(argv)
    preset, context, grid = ("tiny", 512, 4) if args.smoke else ("linmu", args.context, args.grid)
    layers = ["--config.model.layer_types=" + repr(mmate_layer_types(2))] if args.smoke else []
    teacher_layers = ["--config.model.layer_types=" + repr(("full_attention",) * (2 if args.smoke else 36))]
    student = build_model(preset, layers)
    teacher = build_model(preset if args.smoke else "qwen2_5_vl_3b", teacher_layers)
    cfg = student.cfg
    positions, vision = (jnp.asarray(a) for a in video_prompt(context, grid))
    x = jax.random.normal(jax.random.key(0), (1, context, cfg.hidden_size), jnp.bfloat16)
    cos, sin = student.rope(positions)

    first = lambda blocks: jax.tree.map(lambda a: a[0], blocks)  # block 0's layers, unstacked
    layer = first(student.blocks).layers[0]
    attention = first(teacher.blocks).layers[0].mixer
    mixer = layer.mixer
    runs = jax.jit(vision_runs)(vision, positions)
    h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def orders(vision, positions):
        r = vision_runs(vision, positions)
        w = window_order(r, cfg.mmate.window, False)
        return scan_order(r, False), w, window_groups(r, w, cfg.mmate.window, False)

    def flex(x):
        order = scan_order(runs, False)
        return mixer.flex_ma(permute(x, order), permute(runs.is_vision, order),
                             permute(backward_segments(runs), order))[0]

    keys = jax.random.split(jax.random.key(1), 4)
    ssd_in = (jax.random.normal(keys[0], (1, context, h, hd), jnp.bfloat16),
              jax.nn.softplus(jax.random.normal(keys[1], (1, context, h), jnp.float32)) * 0.01,
              -jnp.ones((h,), jnp.float32),
              jax.random.normal(keys[2], (1, context, h, hd), jnp.bfloat16),
              jax.random.normal(keys[3], (1, context, h, hd), jnp.bfloat16))
    parts = {
        "attention": (jax.jit(lambda x: attention(x, cos, sin)[0]), x),
        "mmate": (jax.jit(lambda x: mixer(x, cos, sin, runs)[0]), x),
        "runs_and_orders": (jax.jit(orders), vision, positions),
        "flex_ma": (jax.jit(flex), x),
        "ssd_forward": (jax.jit(lambda *a: ssd_scan(*a)[0]), *ssd_in),
        "local_swin": (jax.jit(lambda x: mixer.swin_branch(x, cos, sin, runs)[0]), x),
        "mlp": (jax.jit(layer.mlp), x),
    }
    rows = []
    for name, (fn, *inputs) in parts.items():
        ms = median_ms(fn, *inputs, warmup=1, iters=5)
        rows.append(dict(part=name, ms=ms, tokens_per_s=context / ms * 1e3))
        print(f"{name}: {ms:.2f} ms", flush=True)
    print(f"\ndevice: {device_description()}, context {context}, hkv {hkv}")
    print_table(rows, ["part", "ms", "tokens_per_s"])
    out = args.out if not args.smoke or args.out != parser.get_default("out") else os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "mmate_layer_smoke.json")
    write_json(out, dict(device=device_description(), context=context, grid=grid, preset=preset, rows=rows))


if __name__ == "__main__":
    main()
