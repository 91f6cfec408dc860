"""The three training losses (spec section 7.2), each as a ``LossTerms`` (numerator, denominator).

Returning the sum and its normaliser separately lets gradient accumulation add micro-batches'
numerators and denominators and divide once, so k micro-batches give exactly the gradient of one
step on their concatenation (``train.step``). ``value = numerator / denominator``.

    cross_entropy        sum_{b,t} m_bt * (-log softmax(z_bt)[y_bt])  /  sum_{b,t} m_bt
    logit_kl             T^2 * sum_{b,t,v} w_bt p^T_btv (log p^T_btv - log p^S_btv)  /  B,
                         p = softmax(z / T) in float32; w = 1 everywhere (the original) or a mask
    layerwise_mse        factor * (1/L) sum_l mean_{b,t,d} (S_l(H_l) - H_{l+1})^2
                         (numerator: factor/L * sum_{l,b,t,d} err^2, denominator: B*T*D)
    combine              the sum of two losses' values, as one (numerator, denominator) pair

Logits are ``[B, T, V]`` (cast to float32 here), targets int ``[B, T]``, masks ``[B, T]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossTerms(NamedTuple):
    """A loss as ``numerator / denominator`` (both float32 scalars)."""

    numerator: jax.Array
    denominator: jax.Array

    @property
    def value(self) -> jax.Array:
        return self.numerator / jnp.maximum(self.denominator, 1e-12)


def _check_rank(name, x, rank):
    if x.ndim != rank:
        raise ValueError(f"{name} must have {rank} axes; got shape {x.shape}")


def cross_entropy(logits, targets, mask) -> LossTerms:
    """Next-token cross-entropy averaged over the tokens where ``mask`` is non-zero.

    logits ``[B, T, V]``; targets int ``[B, T]`` (already shifted: ``targets[t]`` is the token
    after ``t``); mask ``[B, T]`` (weights, 1 = assistant label). Denominator: ``sum(mask)``.
    """
    _check_rank("logits", logits, 3)
    if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(f"targets {targets.shape} and mask {mask.shape} must be logits' [B, T] = {logits.shape[:2]}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return LossTerms(jnp.sum(nll * mask), jnp.sum(mask))


def logit_kl(student_logits, teacher_logits, *, temperature: float = 2.0, mask=None) -> LossTerms:
    """KL(teacher || student) at ``temperature``, times T^2, summed over positions, / batch size.

    PyTorch's ``T**2 * KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T))`` over
    ``[B, T, V]`` logits (float32). ``mask`` ``[B, T]`` (optional) weights positions, e.g. to keep
    label positions only; the denominator stays the batch size B either way.
    """
    _check_rank("student_logits", student_logits, 3)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {student_logits.shape} != teacher logits {teacher_logits.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    per_position = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    if mask is not None:
        if mask.shape != per_position.shape:
            raise ValueError(f"mask {mask.shape} must be the logits' [B, T] = {per_position.shape}")
        per_position = per_position * mask.astype(jnp.float32)
    batch = jnp.asarray(student_logits.shape[0], jnp.float32)
    return LossTerms(temperature ** 2 * jnp.sum(per_position), batch)


def layerwise_mse(student_outputs, teacher_outputs, *, factor: float = 1000.0) -> LossTerms:
    """``factor`` times the mean over layers of each layer's mean squared error.

    student_outputs, teacher_outputs ``[L, B, T, D]``: layer l of the student run on the
    teacher's input to layer l, and the teacher's output of layer l. Every position counts (the
    original's choice: no mask). Computed in float32.
    """
    _check_rank("student_outputs", student_outputs, 4)
    if student_outputs.shape != teacher_outputs.shape:
        raise ValueError(f"student outputs {student_outputs.shape} != teacher outputs {teacher_outputs.shape}")
    layers, batch, time, width = student_outputs.shape
    err = student_outputs.astype(jnp.float32) - teacher_outputs.astype(jnp.float32)
    return LossTerms(factor / layers * jnp.sum(err * err), jnp.asarray(batch * time * width, jnp.float32))


def combine(first: LossTerms, second: LossTerms) -> LossTerms:
    """``first.value + second.value`` over ``first``'s denominator.

    Exact under gradient accumulation when the ratio of the two denominators is the same for
    every micro-batch (e.g. logit_kl's B and layerwise_mse's B*T*D with fixed T and D).
    """
    scale = first.denominator / jnp.maximum(second.denominator, 1e-12)
    return LossTerms(first.numerator + second.numerator * scale, first.denominator)
