"""The ``infinitevl`` command.

    infinitevl demo [--config tiny] [--sample 0] [--max-new-tokens 16] [--config.model.FIELD=VALUE ...]
    infinitevl info [--config infinitevl_4b] [--config.model.FIELD=VALUE ...]

``demo`` is the quickstart's main job (until the trainer lands): it builds the model of a preset
(random weights), feeds it a real image and question from the bundled easy-VQA data set (image
processor, ``<|image_pad|>`` expansion, the Qwen2.5-VL chat template, mRoPE ids), runs one
full forward pass, streams the same embeddings one token at a time through the constant-size
caches (checking both agree), and greedily continues the answer.
``info`` prints a preset's layer pattern, parameter count and decode-cache size.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from infinitevl_jax.config import list_presets, load_config
from infinitevl_jax.convert.commands import register as register_conversion
from infinitevl_jax.evaluate.commands import register as register_evaluation
from infinitevl_jax.infer.commands import register
from infinitevl_jax.train.commands import register as register_training
from infinitevl_jax.models.config import DecoderConfig, VisionLanguageConfig
from infinitevl_jax.models.layers import parameter_count
from infinitevl_jax.models.vlm import VisionLanguageModel


def _model_config(args, overrides) -> VisionLanguageConfig:
    return VisionLanguageConfig.from_config(load_config(args.config, overrides))


def _describe(cfg: DecoderConfig) -> str:
    short = {"sliding_attention": f"SWA(w={cfg.sliding_window})", "full_attention": "ATTN", "linear_attention": "GDN",
             "mmate": "M-MATE", "mmate_shifted": "M-MATE(shifted)"}
    pattern = ", ".join(short[t] for t in cfg.block_pattern)
    return f"{cfg.num_layers} layers = {cfg.num_blocks} x [{pattern}], width {cfg.hidden_size}"


def cmd_info(args, overrides) -> int:
    full_cfg = _model_config(args, overrides)
    cfg = full_cfg.decoder
    abstract = nnx.eval_shape(lambda: VisionLanguageModel(full_cfg, rngs=nnx.Rngs(0)))
    has_full = "full_attention" in cfg.layer_types
    max_len = args.max_len if has_full else None
    cache = jax.eval_shape(lambda: abstract.language_model.init_cache(1, max_len))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    language, vision = parameter_count(abstract.language_model), parameter_count(abstract.visual)
    print(f"preset {args.config}: {_describe(cfg)}")
    print(f"parameters: {(language + vision) / 1e9:.3f} B = language model {language / 1e9:.3f} B "
          f"+ vision tower {vision / 1e9:.3f} B")
    print(f"decode cache per sequence: {cache_bytes / 2**20:.1f} MiB"
          + (f" (full attention sized for {max_len} tokens: grows with context)" if has_full
             else " (constant: independent of tokens seen)"))
    return 0


def cmd_demo(args, overrides) -> int:
    from infinitevl_jax.data import ImageProcessor, expand_placeholders
    from infinitevl_jax.data.easy_vqa import load_easy_vqa
    from infinitevl_jax.data.positions import decode_position_ids
    from infinitevl_jax.data.tokenizer import ByteTokenizer, chat_prompt

    full_cfg = _model_config(args, overrides)
    cfg = full_cfg.decoder
    tokenizer = ByteTokenizer()
    if cfg.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"error: preset vocab_size {cfg.vocab_size} < byte tokenizer's {tokenizer.vocab_size}")
    if full_cfg.vision is None:
        raise SystemExit(f"error: preset {args.config} has no vision tower; the demo feeds an image")
    samples = load_easy_vqa("test")
    if not 0 <= args.sample < len(samples):
        raise SystemExit(f"error: --sample must be in [0, {len(samples)}); got {args.sample}")
    sample = samples[args.sample]
    vision = ImageProcessor(patch_size=full_cfg.vision.patch_size, merge_size=full_cfg.vision.spatial_merge_size,
                            temporal_patch_size=full_cfg.vision.temporal_patch_size)([sample.image_path])
    grid = vision["image_grid_thw"]
    print(f"easy-VQA test sample {args.sample}: {sample.image_path}")
    print(f"  image -> pixel_values {vision['pixel_values'].shape}, grid (t, h, w) = {tuple(int(x) for x in grid[0])}, "
          f"{int(grid.prod()) // full_cfg.vision.merge_unit} image tokens")
    print(f"  question: {sample.question!r}   reference answer: {sample.answer!r}")

    prompt = expand_placeholders(chat_prompt(f"<|vision_start|><|image_pad|><|vision_end|>{sample.question}"), grid)
    ids = np.asarray([tokenizer.encode(prompt)], np.int32)
    model = VisionLanguageModel(full_cfg, rngs=nnx.Rngs(args.seed))
    print(f"model: preset {args.config}, {_describe(cfg)}, {parameter_count(model) / 1e6:.2f} M parameters "
          f"(vision tower {parameter_count(model.visual) / 1e6:.2f} M), random init (seed {args.seed})")

    step = nnx.jit(lambda m, x, pos, c: m(inputs_embeds=x, position_ids=pos, cache=c))
    start = time.perf_counter()
    prepared = model.prepare(ids, **vision)  # ViT, spliced embeddings, mRoPE ids: once for both runs
    full = np.asarray(step(model.language_model, prepared.embeds, prepared.position_ids, None)[0])
    print(f"full forward: {ids.shape[1]} prompt tokens -> logits {full.shape} "
          f"in {time.perf_counter() - start:.2f} s (compile included)")

    cache = model.language_model.init_cache(1, max_len=ids.shape[1] + args.max_new_tokens)
    streamed = []
    for t in tqdm(range(ids.shape[1]), desc="streaming prompt through caches", unit="tok", file=sys.stdout):
        logits, cache = step(model.language_model, prepared.embeds[:, t:t + 1],
                             prepared.position_ids[:, :, t:t + 1], cache)
        streamed.append(np.asarray(logits))
    diff = np.abs(np.concatenate(streamed, axis=1) - full).max()
    cache_kib = sum(x.nbytes for x in jax.tree.leaves(cache)) / 1024
    print(f"streamed vs full forward: max |logit difference| = {diff:.2e} "
          f"(logits up to {np.abs(full).max():.2f}); cache {cache_kib:.1f} KiB")

    vocab = tokenizer.vocab_size  # the preset's vocabulary may be larger than the tokenizer's
    generated = []
    next_id = int(np.argmax(streamed[-1][0, -1, :vocab]))
    for _ in range(args.max_new_tokens):
        if next_id == tokenizer.eos_id:
            break
        generated.append(next_id)
        position = decode_position_ids(ids.shape[1] + len(generated) - 1, prepared.rope_deltas)
        logits, cache = step(model.language_model, model.embed(jnp.asarray([[next_id]])), position, cache)
        next_id = int(np.argmax(np.asarray(logits)[0, -1, :vocab]))
    print(f"greedy continuation ({len(generated)} tokens, untrained weights): "
          f"{tokenizer.decode(generated)!r}")
    if diff > args.tolerance * max(1.0, float(np.abs(full).max())):
        print(f"error: streamed logits differ from the full forward by {diff:.2e}")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinitevl", description="InfiniteVL in JAX/Flax.",
                                     epilog="Config fields can be overridden with --config.PATH=VALUE, "
                                            "e.g. --config.model.sliding_window=32.")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = ", ".join(list_presets())

    demo = sub.add_parser("demo", help="quickstart: tiny model on a bundled easy-VQA image and question (CPU)")
    demo.add_argument("--config", default="tiny", help=f"preset name ({presets}) or path to a config .py")
    demo.add_argument("--sample", type=int, default=0, help="easy-VQA test sample index")
    demo.add_argument("--seed", type=int, default=0, help="parameter init seed")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--tolerance", type=float, default=1e-4,
                      help="largest allowed streamed-vs-full logit difference, relative to the logit scale")
    demo.set_defaults(run=cmd_demo)

    info = sub.add_parser("info", help="layer pattern, parameter count and cache size of a preset")
    info.add_argument("--config", default="infinitevl_4b", help=f"preset name ({presets}) or path")
    info.add_argument("--max-len", type=int, default=65536,
                      help="tokens a full-attention cache must hold (teacher presets only)")
    info.set_defaults(run=cmd_info)

    register_conversion(sub)
    register(sub)
    register_evaluation(sub)
    register_training(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args, rest)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
