"""Gated DeltaNet token mixer (spec section 2), with a constant-size cache.

For input x ``[B, T, D]`` (already through ``input_layernorm``), H heads, d_k, d_v:

    q~, k~, v~ = SiLU(causal_conv(x W_q)), SiLU(causal_conv(x W_k)), SiLU(causal_conv(x W_v))
    q, k       = per-head L2 normalisation of q~, k~ (eps 1e-6 inside the sqrt), in float32
    beta       = sigmoid(x W_b)                                  [B, T, H]
    g          = -exp(A_log) * softplus(x W_a + dt_bias)         [B, T, H], float32
    o          = gated_delta_rule(q, k, v, g, beta)              scale d_k^-1/2
    out        = W_o( GatedRMSNorm(o, gate = x W_g) )            norm over d_v, eps 1e-5

No positional encoding; the conv runs over the flat channel axis before the head split.

Padding in cache mode (``valid`` false): the layer's input there is zeroed, so the conv taps of
later tokens see zeros (q/k/v projections have no bias), and ``g = 0, beta = 0``, so the state
passes through unchanged (``S <- e^0 S + k * 0``). Leading pads thus keep the state and conv tails
exactly zero; right padding (from ``valid_len`` on) leaves the cache exactly as the real tokens
left it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.models.config import DecoderConfig
from infinitevl_jax.models.layers import Dense, GatedRMSNorm
from infinitevl_jax.ops.conv import causal_conv1d, init_conv_cache
from infinitevl_jax.ops.delta_rule import gated_delta_rule


class GatedDeltaNetCache(NamedTuple):
    """Per-layer decode state: raw conv inputs of the last ``conv_size - 1`` tokens and the
    float32 recurrent state ``[B, H, d_k, d_v]``. Its size never depends on tokens seen."""

    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array
    state: jax.Array


def init_gated_deltanet_cache(cfg: DecoderConfig, batch: int) -> GatedDeltaNetCache:
    """Zero conv tails (compute dtype) and zero float32 state: the start of a sequence."""
    g, dtype = cfg.gdn, cfg.compute_dtype
    key_dim, value_dim = g.num_heads * g.head_k_dim, g.num_heads * g.head_v_dim
    return GatedDeltaNetCache(
        conv_q=init_conv_cache(batch, g.conv_size, key_dim, dtype),
        conv_k=init_conv_cache(batch, g.conv_size, key_dim, dtype),
        conv_v=init_conv_cache(batch, g.conv_size, value_dim, dtype),
        state=jnp.zeros((batch, g.num_heads, g.head_k_dim, g.head_v_dim), jnp.float32))


def l2_normalize(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (FLA's in-kernel l2norm)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _uniform(rngs, shape, low, high):
    return jax.random.uniform(rngs.params(), shape, jnp.float32, low, high)


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        g = cfg.gdn
        self.cfg = cfg
        key_dim, value_dim = g.num_heads * g.head_k_dim, g.num_heads * g.head_v_dim
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.q_proj = Dense(d, key_dim, axes=("embed", "heads"), **dense)
        self.k_proj = Dense(d, key_dim, axes=("embed", "heads"), **dense)
        self.v_proj = Dense(d, value_dim, axes=("embed", "heads"), **dense)
        self.a_proj = Dense(d, g.num_heads, axes=("embed", "heads"), **dense)
        self.b_proj = Dense(d, g.num_heads, axes=("embed", "heads"), **dense)
        self.g_proj = Dense(d, value_dim, axes=("embed", "heads"), **dense)
        self.o_proj = Dense(value_dim, d, axes=("heads", "embed"), **dense)
        bound = 1.0 / math.sqrt(g.conv_size)  # PyTorch's default Conv1d init for fan_in = conv_size
        conv = lambda c: nnx.Param(_uniform(rngs, (g.conv_size, c), -bound, bound).astype(cfg.weight_dtype),
                                   logical_axes=("conv", "heads"))
        self.q_conv = conv(key_dim)
        self.k_conv = conv(key_dim)
        self.v_conv = conv(value_dim)
        # A ~ U(1, 16); dt log-uniform in [1e-3, 1e-1] stored as softplus^-1(dt) (FLA's init).
        self.A_log = nnx.Param(jnp.log(_uniform(rngs, (g.num_heads,), 1.0, 16.0)).astype(cfg.weight_dtype),
                               logical_axes=("heads",))
        dt = jnp.maximum(jnp.exp(_uniform(rngs, (g.num_heads,), math.log(1e-3), math.log(1e-1))), 1e-4)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(cfg.weight_dtype), logical_axes=("heads",))
        self.o_norm = GatedRMSNorm(g.head_v_dim, eps=g.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)

    def __call__(self, x, *, cache: GatedDeltaNetCache | None = None, segment_ids=None, valid=None,
                 valid_len=None):
        """x ``[B, T, D]`` -> (``[B, T, D]``, updated cache or None).

        Cache mode only: ``valid`` bool ``[B, T]`` marks real tokens (False: padding, see the module
        docstring); ``valid_len`` = real tokens of x, a prefix (None: all T), where the conv tails end.
        """
        g = self.cfg.gdn
        batch, seq_len, _ = x.shape
        if valid is not None:
            x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))

        def branch(proj, weight, conv_cache, head_dim):
            y, new_conv = causal_conv1d(proj(x), weight[...].astype(self.cfg.compute_dtype),
                                        cache=conv_cache, segment_ids=segment_ids, valid_len=valid_len)
            return jax.nn.silu(y).reshape(batch, seq_len, g.num_heads, head_dim), new_conv

        previous = cache if cache is not None else GatedDeltaNetCache(None, None, None, None)  # None: start
        q, conv_q = branch(self.q_proj, self.q_conv, previous.conv_q, g.head_k_dim)
        k, conv_k = branch(self.k_proj, self.k_conv, previous.conv_k, g.head_k_dim)
        v, conv_v = branch(self.v_proj, self.v_conv, previous.conv_v, g.head_v_dim)
        beta = jax.nn.sigmoid(self.b_proj(x))
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        decay = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
        if valid is not None:
            beta = jnp.where(valid[..., None], beta, jnp.zeros((), beta.dtype))
            decay = jnp.where(valid[..., None], decay, 0.0)
        o, state = gated_delta_rule(l2_normalize(q), l2_normalize(k), v, decay, beta,
                                    initial_state=previous.state, segment_ids=segment_ids,
                                    impl=self.cfg.delta_rule_impl)
        gate = self.g_proj(x).reshape(batch, seq_len, g.num_heads, g.head_v_dim)
        out = self.o_proj(self.o_norm(o, gate).reshape(batch, seq_len, -1))
        new_cache = None if cache is None else GatedDeltaNetCache(conv_q, conv_k, conv_v, state)
        return out, new_cache
