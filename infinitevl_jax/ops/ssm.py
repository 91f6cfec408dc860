"""Mamba2's selective state-space scan (SSD), forward or reverse, with packed-sequence resets.

One public scan, ``ssd_scan``, and a one-token decode step, ``ssd_step``. Per batch row and
head the state ``S`` is an ``N x P`` float32 matrix (zero, or ``initial_state``), and for every
token t, in order:

    S   <- 0                                   if reset_t (token t starts a new segment)
    S   <- exp(dt_t A) S + dt_t B_t x_t^T       (B_t: [N], x_t: [P])
    y_t  = S^T C_t                              ([P])

``dt`` are step sizes (>= 0, already through softplus) and ``A`` is a negative per-head rate,
so ``a_t = dt_t A <= 0`` is a log-decay. There is no ``D`` skip term and no output gate: the
caller adds them. Unrolled, with ``seg(i)`` the segment of token i and ``i0`` its first token,

    y_i = sum_{j <= i, seg(j) = seg(i)} (C_i . B_j) dt_j exp(sum_{j < k <= i} a_k) x_j
          + [seg(i) is the first segment] exp(sum_{k <= i} a_k) S_0^T C_i.

Impls (``impl=``):

- ``"recurrent"``: ``lax.scan`` over tokens; memory under reverse-mode autodiff is one state
  per token. Used for single tokens and as the simple form the chunked one is tested against.
- ``"chunked"``: the SSD chunk algorithm. The sequence is cut into chunks of ``L`` tokens (the
  tail padded with dt = 0, x = B = C = 0: decay 1 and no input, so real outputs and the final
  state are unchanged). Inside a chunk, with inclusive cumulative log-decay
  ``gamma_i = sum_{k <= i} a_k`` and ``E_ij = exp(sum_{j < k <= i} a_k)`` for ``i >= j``:

      Y     = (C B^T * E * mask) (dt x)  +  diag(e^gamma * sees_state) C S_in
      S_out = e^{gamma_L} [no reset in chunk] S_in  +  (diag(E_Lj * in_last_segment) B)^T (dt x)

  ``mask`` is causal and same-segment; ``sees_state`` is true for tokens before the chunk's
  first reset; ``in_last_segment`` for tokens in the chunk's last segment. Everything but the
  walk of ``S`` across chunks is a batched matmul over all chunks; the walk is a parallel
  prefix scan (``lax.associative_scan``: log2 of the chunk count steps, each a multiply-add
  over all chunks, instead of one sequential step per chunk), keeping states per chunk, so
  memory, also under autodiff, is O(T (N + P + L)) plus O(1) states per chunk.
- ``"auto"``: ``recurrent`` for a single token, else ``chunked``.

Numerics: ``E_ij``'s exponent is summed over ``(j, i]`` directly (a masked cumulative sum),
never formed as a difference of two long running sums, which would lose float32 precision
after strong decays (a run of ``a = -20`` makes ``gamma`` ~ -1300, whose float32 spacing is
~1e-4). Masked exponents are set to 0 *before* ``exp`` and the result is zeroed afterwards, so
strong decays underflow cleanly to 0 and gradients stay finite. Decays, sums and the state are
float32 whatever the input dtype; with float32 inputs every matmul is float32 at HIGHEST
precision, with bf16/f16 ``x`` the chunked impl's four chunk-parallel matmuls take 16-bit
operands with float32 accumulation (FLA's choice; 6.7 -> 4.5 ms for 64K tokens x 16 heads of
128 on an H200, ``benchmarks/mmate_layer_gpu.py``).

Reverse direction (``reverse=True``) is *defined* as: flip the time axis of x, dt, B, C and
segment_ids, run the forward scan, flip y back. Hence token t's state collects tokens
t, t+1, ... up to the end of t's segment,

    S_t = exp(dt_t A) S_{t+1} + dt_t B_t x_t^T,      y_t = S_t^T C_t,

(the decay applied when adding token t is token t's own ``exp(dt_t A)``, so the weight of token
s >= t in y_t is ``exp(sum_{t <= k < s} a_k)``), a segment starts wherever a token's id differs
from the *next* token's, ``initial_state`` enters at token T-1 (reaching the last segment
only), and the returned final state is the state after token 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.chunk_math import matmul_dtype_for
from infinitevl_jax.ops.chunk_math import mm as _mm
from infinitevl_jax.ops.chunk_math import pad_to_chunks, to_chunks
from infinitevl_jax.ops.conv import check_segment_ids
from infinitevl_jax.ops.delta_rule import segment_resets

IMPLS = ("recurrent", "chunked")
CHUNK_SIZE = 64

__all__ = ["ssd_scan", "ssd_step", "IMPLS", "CHUNK_SIZE"]


# --------------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------------


def _check_scan_inputs(x, dt, a, b, c, initial_state, segment_ids, chunk_size):
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, time, heads, head_dim] (4-D); got shape {x.shape}")
    batch, seq_len, heads, head_dim = x.shape
    if seq_len == 0:
        raise ValueError("ssd_scan needs at least one token (x's time axis has length 0)")
    if dt.shape != (batch, seq_len, heads):
        raise ValueError(f"dt must be [batch, time, heads] = {(batch, seq_len, heads)}; got {dt.shape}")
    if a.shape != (heads,):
        raise ValueError(f"A must be [heads] = {(heads,)}; got {a.shape}")
    if b.ndim != 4 or b.shape[:3] != (batch, seq_len, heads):
        raise ValueError(f"B must be [batch, time, heads, d_state] = [{batch}, {seq_len}, {heads}, d_state]; "
                         f"got {b.shape}")
    if c.shape != b.shape:
        raise ValueError(f"C must have B's shape {b.shape}; got {c.shape}")
    state_shape = (batch, heads, b.shape[-1], head_dim)
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [batch, heads, d_state, head_dim] = {state_shape}; "
                         f"got {initial_state.shape}")
    check_segment_ids(segment_ids, batch, seq_len)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def _check_step_inputs(x, dt, a, b, c, state):
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, heads, head_dim] (3-D) for one token; got shape {x.shape}")
    batch, heads, head_dim = x.shape
    if dt.shape != (batch, heads):
        raise ValueError(f"dt must be [batch, heads] = {(batch, heads)}; got {dt.shape}")
    if a.shape != (heads,):
        raise ValueError(f"A must be [heads] = {(heads,)}; got {a.shape}")
    if b.ndim != 3 or b.shape[:2] != (batch, heads):
        raise ValueError(f"B must be [batch, heads, d_state] = [{batch}, {heads}, d_state]; got {b.shape}")
    if c.shape != b.shape:
        raise ValueError(f"C must have B's shape {b.shape}; got {c.shape}")
    state_shape = (batch, heads, b.shape[-1], head_dim)
    if state.shape != state_shape:
        raise ValueError(f"state must be [batch, heads, d_state, head_dim] = {state_shape}; got {state.shape}")


def _resolve_impl(impl: str, seq_len: int) -> str:
    if impl == "auto":
        return "recurrent" if seq_len == 1 else "chunked"
    if impl not in IMPLS:
        raise ValueError(f"unknown ssd_scan impl {impl!r}; choose one of {['auto', *IMPLS]}")
    return impl


# --------------------------------------------------------------------------------------------
# The two forward impls (float32 in, float32 out).
# --------------------------------------------------------------------------------------------


def _token_update(state, x_t, dt_t, a, b_t, c_t):
    """One token: ``S <- exp(dt A) S + dt B x^T``, ``y = S^T C``. Shapes ``[B, H, ...]``."""
    decay = jnp.exp(dt_t * a)[..., None, None]  # [B, H, 1, 1]
    state = decay * state + (dt_t[..., None, None] * b_t[..., :, None]) * x_t[..., None, :]
    return state, _mm("bhnp,bhn->bhp", state, c_t)


def _recurrent_scan(x, dt, a, b, c, initial_state, reset, chunk_size=None, matmul_dtype=None):
    """Token-serial scan. x ``[B, T, H, P]``, dt ``[B, T, H]``, a ``[H]``, b/c ``[B, T, H, N]``,
    initial_state ``[B, H, N, P]``, reset ``[B, T]`` bool; all float32. ``chunk_size`` and
    ``matmul_dtype`` are unused (the token recurrence is float32 throughout).
    Returns y ``[B, T, H, P]`` and the final state."""
    del chunk_size, matmul_dtype

    def step(state, xs):
        x_t, dt_t, b_t, c_t, r_t = xs
        state = jnp.where(r_t[:, None, None, None], 0.0, state)
        return _token_update(state, x_t, dt_t, a, b_t, c_t)

    time_major = [jnp.moveaxis(v, 1, 0) for v in (x, dt, b, c, reset)]
    final_state, y = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(y, 0, 1), final_state


def _chunked_scan(x, dt, a, b, c, initial_state, reset, chunk_size=CHUNK_SIZE, matmul_dtype=jnp.float32):
    """SSD chunk algorithm; same contract as ``_recurrent_scan``; ``matmul_dtype``: the operand
    dtype of the chunk-parallel matmuls (decays, sums and the state stay float32)."""
    batch, seq_len, heads, head_dim = x.shape
    size = min(chunk_size, seq_len)  # no point padding a short sequence up to a full chunk
    log_decay = dt * a  # [B, T, H]
    x_dt = x * dt[..., None]  # [B, T, H, P]
    (log_decay, x_dt, b, c, reset), n_chunks = pad_to_chunks((log_decay, x_dt, b, c, reset), size)
    log_decay, x_dt, b, c = (to_chunks(v, size) for v in (log_decay, x_dt, b, c))  # log_decay: [B, H, n, L]
    segment = jnp.cumsum(reset.reshape(batch, 1, n_chunks, size).astype(jnp.int32), axis=-1)  # [B, 1, n, L]

    row = jnp.arange(size)[:, None]
    col = jnp.arange(size)[None, :]
    # exponent[i, j] = sum of a_k over j < k <= i: a cumulative sum (over k) of a_k masked to
    # k > j. Only the terms that matter enter each sum, so it stays accurate after long strong
    # decays, unlike gamma_i - gamma_j. (A matmul form of this sum measured no faster on an H200.)
    exponent = jnp.cumsum(jnp.where(row > col, log_decay[..., :, None], 0.0), axis=-2)  # [B, H, n, L, L]
    gamma = jnp.cumsum(log_decay, axis=-1)  # [B, H, n, L], inclusive
    visible = (row >= col) & (segment[..., :, None] == segment[..., None, :])  # [B, 1, n, L, L]
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, exponent, 0.0)), 0.0)

    sees_state = segment == 0  # [B, 1, n, L]: before the chunk's first reset
    in_last_segment = segment == segment[..., -1:]
    decay_in = jnp.where(sees_state, jnp.exp(jnp.where(sees_state, gamma, 0.0)), 0.0)  # S_in -> token i
    to_end = exponent[..., -1, :]  # [B, H, n, L]: token j -> chunk end
    decay_out = jnp.where(in_last_segment, jnp.exp(jnp.where(in_last_segment, to_end, 0.0)), 0.0)
    keeps_state = sees_state[..., -1]  # [B, 1, n]
    decay_chunk = jnp.where(keeps_state, jnp.exp(jnp.where(keeps_state, gamma[..., -1], 0.0)), 0.0)  # [B, H, n]

    # The chunk-parallel terms: each chunk's own contribution to its final state, and the
    # intra-chunk outputs.
    written = _mm("bhcjn,bhcjp->bhcnp", b * decay_out[..., None], x_dt, dtype=matmul_dtype)  # [B, H, n, N, P]
    scores = _mm("bhcin,bhcjn->bhcij", c, b, dtype=matmul_dtype) * decay  # [B, H, n, L, L]
    y_intra = _mm("bhcij,bhcjp->bhcip", scores, x_dt, dtype=matmul_dtype)  # [B, H, n, L, P]

    # The walk across chunks, S_c = d_c S_{c-1} + W_c, as a parallel prefix scan over (d, W)
    # pairs (log2(n) steps, not n sequential ones): (d1, W1) then (d2, W2) is (d1 d2, d2 W1 + W2).
    def then(earlier, later):
        (d1, w1), (d2, w2) = earlier, later
        return d1 * d2, d2[..., None, None] * w1 + w2

    through, gathered = jax.lax.associative_scan(then, (jnp.moveaxis(decay_chunk, 2, 0),
                                                         jnp.moveaxis(written, 2, 0)))  # [n, B, H(, N, P)]
    after = gathered + through[..., None, None] * initial_state  # the state after each chunk
    final_state = after[-1]
    entry = jnp.moveaxis(jnp.concatenate([initial_state[None], after[:-1]]), 0, 2)  # [B, H, n, N, P]: entering
    y = y_intra + _mm("bhcin,bhcnp->bhcip", c * decay_in[..., None], entry, dtype=matmul_dtype)  # [B, H, n, L, P]
    y = jnp.moveaxis(y, 1, 3).reshape(batch, n_chunks * size, heads, head_dim)[:, :seq_len]
    return y, final_state


_IMPL_FNS = {"recurrent": _recurrent_scan, "chunked": _chunked_scan}


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def ssd_scan(x, dt, A, B, C, *, initial_state=None, segment_ids=None, reverse=False, impl="auto",
             chunk_size=CHUNK_SIZE):
    """Mamba2 SSD scan over a sequence (the module docstring has the math).

    Args:
      x: ``[B, T, H, P]`` inputs (any float dtype).
      dt: ``[B, T, H]`` step sizes (>= 0, after softplus).
      A: ``[H]`` per-head rates (negative); token t decays the state by ``exp(dt_t A)``.
      B, C: ``[B, T, H, N]`` input and output projections of the state.
      initial_state: optional ``[B, H, N, P]`` state entering token 0 (token T-1 when
        ``reverse``); it reaches the first segment only (the last one when ``reverse``).
      segment_ids: optional ``[B, T]`` integer ids of packed sequences; a token whose id differs
        from the previous token's (the next token's when ``reverse``) starts from ``S = 0``.
      reverse: scan from the last token to the first: exactly flip time, scan, flip y back.
      impl: ``"auto"``, ``"recurrent"`` or ``"chunked"``.
      chunk_size: tokens per chunk for ``"chunked"`` (any T: the tail is padded internally).

    Returns:
      ``(y, final_state)``: y ``[B, T, H, P]`` in x's dtype; final_state ``[B, H, N, P]``
      float32, the state after the last token processed (token 0 when ``reverse``).
    """
    _check_scan_inputs(x, dt, A, B, C, initial_state, segment_ids, chunk_size)
    batch, seq_len, heads, head_dim = x.shape
    fn = _IMPL_FNS[_resolve_impl(impl, seq_len)]
    x32, dt32, b32, c32 = (v.astype(jnp.float32) for v in (x, dt, B, C))
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, B.shape[-1], head_dim), jnp.float32)
    if reverse:
        x32, dt32, b32, c32 = (jnp.flip(v, axis=1) for v in (x32, dt32, b32, c32))
        if segment_ids is not None:
            segment_ids = jnp.flip(segment_ids, axis=1)
    reset = segment_resets(segment_ids, seq_len, batch)
    y, final_state = fn(x32, dt32, A.astype(jnp.float32), b32, c32, initial_state.astype(jnp.float32), reset,
                        chunk_size, matmul_dtype_for(x.dtype))
    if reverse:
        y = jnp.flip(y, axis=1)
    return y.astype(x.dtype), final_state


def ssd_step(x, dt, A, B, C, state):
    """One token of the scan (decoding): ``S <- exp(dt A) S + dt B x^T``, ``y = S^T C``.

    Args:
      x: ``[B, H, P]``; dt: ``[B, H]``; A: ``[H]``; B, C: ``[B, H, N]``;
      state: ``[B, H, N, P]`` (cast to float32).

    Returns:
      ``(y, new_state)``: y ``[B, H, P]`` in x's dtype, new_state ``[B, H, N, P]`` float32.
    """
    _check_step_inputs(x, dt, A, B, C, state)
    x32, dt32, a32, b32, c32, s32 = (v.astype(jnp.float32) for v in (x, dt, A, B, C, state))
    new_state, y = _token_update(s32, x32, dt32, a32, b32, c32)
    return y.astype(x.dtype), new_state
