"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

For logits ``z [B, V]`` (float32) and a ``SamplingConfig``:

- ``temperature == 0``: greedy, ``argmax_i z_i`` (lowest index on ties);
- otherwise, in this order (Hugging Face's): ``z <- z / temperature``; top-k keeps the tokens
  whose logit is at least the k-th largest; top-p (nucleus) keeps, in decreasing order of
  probability ``p = softmax(z)`` over what is left, the tokens whose preceding mass is below
  ``top_p`` (so at least one); everything else gets ``-inf``, and the token is drawn from
  ``softmax`` of the result with ``jax.random.categorical`` and an explicit key.

Ties at a top-k or top-p threshold are all kept. ``vocab_limit`` restricts every choice to ids
``< vocab_limit`` (a tokenizer smaller than the model's embedding table).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; hashable, so jitted functions take it as a static argument."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits, cfg: SamplingConfig):
    """Tempered logits ``[..., V]`` with everything outside top-k / top-p set to ``-inf``."""
    z = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, cfg.top_k)[0][..., -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    if cfg.top_p < 1:
        ordered = jnp.sort(z, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)  # >= 1: the first has 0 before it
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        z = jnp.where(z >= threshold, z, -jnp.inf)
    return z


def sample_tokens(logits, key, cfg: SamplingConfig, vocab_limit: int | None = None):
    """int32 ``[B]`` next tokens from logits ``[B, V]``; ``key`` is unused when greedy."""
    if vocab_limit is not None:
        if not 0 < vocab_limit <= logits.shape[-1]:
            raise ValueError(f"vocab_limit must be in [1, {logits.shape[-1]}] (the logits' width); got {vocab_limit}")
        logits = logits[..., :vocab_limit]
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
