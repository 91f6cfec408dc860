"""The ``generate`` and ``stream`` subcommands of ``infinitevl``.

    infinitevl generate (--model DIR | --config PRESET) [--image PATH ...] --prompt TEXT
                        [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0]
    infinitevl stream (--model DIR | --config PRESET) --video PATH [--ask "t=30s:question" ...]
                      [--fps 2] [--frame-size 448] [--max-new-tokens 64]

``--model`` loads a checkpoint directory (weights and its ``tokenizer.json``); ``--config`` builds
a preset with random weights (seed ``--seed``) and the byte tokenizer, so answers are noise but
every step runs (answers use only the tokenizer's ids). Preset fields can be overridden with
``--config.model.FIELD=VALUE``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from flax import nnx
from tqdm import tqdm

from infinitevl_jax.config import list_presets, load_config
from infinitevl_jax.data.tokenizer import load_tokenizer
from infinitevl_jax.infer.engine import DecoderEngine, cache_bytes
from infinitevl_jax.infer.generate import Request, generate
from infinitevl_jax.infer.sampling import SamplingConfig
from infinitevl_jax.infer.session import StreamingSession
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel

WARMUP_FRAMES = 2  # the first frames compile; the summary leaves them out


def load_model(args, overrides):
    """``(model, tokenizer)`` from ``--model DIR`` or ``--config PRESET`` (random weights)."""
    if args.model is not None:
        if overrides:
            raise ValueError(f"config overrides {overrides} apply to --config presets, not to --model checkpoints")
        from infinitevl_jax.convert.pretrained import load_pretrained  # heavy: only when a checkpoint is read

        return load_pretrained(args.model, param_dtype=args.param_dtype), load_tokenizer(args.model)
    cfg = VisionLanguageConfig.from_config(load_config(args.config, overrides))
    return VisionLanguageModel(cfg.with_dtypes(param_dtype=args.param_dtype), rngs=nnx.Rngs(args.seed)), \
        load_tokenizer(None)


def sampling_from(args) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def parse_ask(text: str) -> tuple[float, str]:
    """``"t=30s:question"`` (also ``t=1.5:...``, ``t=2m:...``, ``t=1m30s:...``) -> (seconds, question)."""
    match = re.fullmatch(r"t=(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?:(.+)", text.strip(), re.DOTALL)
    if match is None or (match.group(1) is None and match.group(2) is None):
        raise ValueError(f"--ask must look like 't=30s:question' (or t=1m30s:, t=12.5:); got {text!r}")
    minutes, seconds, question = match.groups()
    return float(minutes or 0) * 60 + float(seconds or 0), question.strip()


def stream_times(num_frames: int, source_fps: float, fps: float) -> list[tuple[float, int]]:
    """``(stream seconds, source frame index)`` of the frames fed at ``fps`` from a video of
    ``num_frames`` frames at ``source_fps`` (every frame once when ``fps >= source_fps``)."""
    if not fps > 0:
        raise ValueError(f"--fps must be positive; got {fps}")
    step = max(1.0 / fps, 1.0 / source_fps)
    count = max(1, int(np.floor(num_frames / source_fps / step + 1e-9)))
    return [(i * step, min(int(round(i * step * source_fps)), num_frames - 1)) for i in range(count)]


def cmd_generate(args, overrides) -> int:
    model, tokenizer = load_model(args, overrides)
    engine = DecoderEngine(model.language_model, chunk_size=args.chunk_size)
    answer = generate(model, tokenizer, [Request(args.prompt, tuple(args.image))], max_new_tokens=args.max_new_tokens,
                      sampling=sampling_from(args), seed=args.seed, engine=engine, progress=True)[0]
    print(answer.text)
    steps = max(len(answer.token_ids), 1)
    print(f"[{answer.prompt_tokens} prompt tokens, prefill {answer.prefill_seconds:.2f} s (compile included); "
          f"{len(answer.token_ids)} new tokens ({answer.finish_reason}), {answer.decode_seconds / steps * 1e3:.1f} ms "
          f"per token]", file=sys.stderr)
    return 0


def cmd_stream(args, overrides) -> int:
    from infinitevl_jax.data import load_video

    asks = sorted(parse_ask(a) for a in args.ask)
    video = load_video(args.video)
    source_fps = video.fps or args.fps
    schedule = stream_times(len(video.frames), source_fps, args.fps)
    model, tokenizer = load_model(args, overrides)
    full = "full_attention" in model.cfg.decoder.layer_types
    session = StreamingSession(model, tokenizer, engine=DecoderEngine(model.language_model, chunk_size=args.chunk_size),
                               frame_size=args.frame_size, max_len=args.max_len if full else None)
    sampling = sampling_from(args)
    print(f"{args.video}: {len(video.frames)} frames at {source_fps:g} fps -> {len(schedule)} frames streamed at "
          f"{min(args.fps, source_fps):g} fps, {args.frame_size}x{args.frame_size} px; decode cache "
          f"{cache_bytes(session.cache) / 2**20:.1f} MiB")

    def answer(at: float, question: str, bar):
        reply = session.ask(question, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
        per_token_ms = reply.decode_seconds / max(len(reply.token_ids), 1) * 1e3
        bar.write(f"[t={at:g}s, stream {session.tokens_seen} tokens] Q: {question}\n  A: {reply.text!r} "
                  f"({len(reply.token_ids)} tokens, {reply.finish_reason}; prefill "
                  f"{reply.prefill_seconds * 1e3:.0f} ms, {per_token_ms:.1f} ms/token)")

    latencies = []
    with tqdm(schedule, desc="stream", unit="frame", file=sys.stdout) as bar:
        for seconds, index in bar:
            while asks and asks[0][0] < seconds:
                answer(*asks.pop(0), bar)
            start = time.perf_counter()
            session.push_frame(video.frames[index], seconds)
            session.synchronize()
            latencies.append(time.perf_counter() - start)
            bar.set_postfix(ms_per_frame=f"{latencies[-1] * 1e3:.1f}", fps=f"{1 / latencies[-1]:.1f}")
        for at, question in asks:  # asked at or after the end of the video
            answer(at, question, bar)
    steady = latencies[WARMUP_FRAMES:] or latencies
    mean = float(np.mean(steady))
    print(f"streamed {len(latencies)} frames ({session.tokens_seen} tokens); per frame (processor + ViT + decoder, "
          f"first {WARMUP_FRAMES} frames with compiles left out): mean {mean * 1e3:.1f} ms = {1 / mean:.1f} FPS, "
          f"worst {max(steady) * 1e3:.1f} ms; decode cache {cache_bytes(session.cache) / 2**20:.1f} MiB")
    return 0


def _common(parser: argparse.ArgumentParser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="checkpoint directory (weights + tokenizer.json)")
    source.add_argument("--config", default="tiny",
                        help=f"preset ({', '.join(list_presets())}) or config .py, random weights (default tiny)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0, help="sampling key (and random-weight init)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk, tokens")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                        help="weight dtype (default: the checkpoint loader's or the preset's; bfloat16 halves "
                             "memory and weight reads per token)")


def register(subparsers) -> None:
    """Adds ``generate`` and ``stream`` to the ``infinitevl`` command's subparsers."""
    gen = subparsers.add_parser("generate", help="answer a prompt (with images) from a checkpoint or preset")
    _common(gen)
    gen.add_argument("--image", action="append", default=[], help="image shown before the prompt (repeatable)")
    gen.add_argument("--prompt", required=True, help="the user's message")
    gen.set_defaults(run=cmd_generate)

    stream = subparsers.add_parser("stream", help="stream a video through the model, answer questions on the way")
    _common(stream)
    stream.add_argument("--video", required=True, help="GIF / WebP / multi-frame image file or a directory of frames")
    stream.add_argument("--ask", action="append", default=[],
                        help="'t=30s:question': ask after the frames up to 30 s (repeatable)")
    stream.add_argument("--fps", type=float, default=2.0,
                        help="frames fed per second of video (also the rate of frame directories)")
    stream.add_argument("--frame-size", type=int, default=448, help="frames are resized to this square size")
    stream.add_argument("--max-len", type=int, default=65536,
                        help="tokens a full-attention (teacher) cache holds; hybrid models ignore it")
    stream.set_defaults(run=cmd_stream)
