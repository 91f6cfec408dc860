"""Inference: chunked prefill and compiled-once decoding with constant-size caches, sampling,
batched generation, and a streaming session (frames and text in, answers out)."""

from infinitevl_jax.infer.engine import DecoderEngine, cache_bytes, chunk_plan
from infinitevl_jax.infer.generate import Answer, Generation, Request, generate, generate_tokens, prepare_prompts
from infinitevl_jax.infer.sampling import SamplingConfig, sample_tokens
from infinitevl_jax.infer.session import StreamingSession

__all__ = [
    "Answer", "DecoderEngine", "Generation", "Request", "SamplingConfig", "StreamingSession", "cache_bytes",
    "chunk_plan", "generate", "generate_tokens", "prepare_prompts", "sample_tokens",
]
