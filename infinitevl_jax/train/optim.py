"""The optimiser: AdamW with linear warmup + cosine decay and global-norm clipping on the
trainable parameters; frozen parameters get zero updates and no optimiser state.

    lr(s) = peak * s / W                                                   s < W
          = end + (peak - end) * (1 + cos(pi * (s - W) / (N - W))) / 2      W <= s <= N

(HF's ``cosine`` schedule with ``end = 0``; W = ceil(warmup_ratio * N) when only a ratio is
given). Clipping (``max_grad_norm``) uses the global norm over the trainable gradients only.
Gradient accumulation happens in the train step (``train.step``), which averages micro-batch
gradients exactly before the single optimiser update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import optax

TRAINABLE, FROZEN = "trainable", "frozen"


def warmup_steps(total_steps: int, *, warmup_steps: int | None = None, warmup_ratio: float = 0.0) -> int:
    """Explicit ``warmup_steps``, else ``ceil(warmup_ratio * total_steps)`` (HF's rule)."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return math.ceil(warmup_ratio * total_steps)


def learning_rate_schedule(peak: float, total_steps: int, warmup: int, end: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine to ``end`` at ``total_steps``."""
    if not 0 <= warmup < total_steps:
        raise ValueError(f"need 0 <= warmup ({warmup}) < total_steps ({total_steps})")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=total_steps, end_value=end)


def make_optimizer(cfg: Mapping[str, Any], mask) -> optax.GradientTransformation:
    """AdamW over the parameters where ``mask`` (a bool tree like the params) is True.

    ``cfg`` (the config's ``train.optim``): learning_rate, total_steps, warmup_steps or
    warmup_ratio, end_learning_rate, b1, b2, eps, weight_decay, max_grad_norm (<= 0: no
    clipping). Frozen parameters go through ``optax.set_to_zero`` (no state).
    """
    total = int(cfg["total_steps"])
    warm = warmup_steps(total, warmup_steps=cfg.get("warmup_steps"), warmup_ratio=cfg.get("warmup_ratio", 0.0))
    schedule = learning_rate_schedule(cfg["learning_rate"], total, warm, cfg.get("end_learning_rate", 0.0))
    adamw = optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                        weight_decay=cfg.get("weight_decay", 0.0))
    clip = cfg.get("max_grad_norm", 1.0)
    trainable = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip and clip > 0 else adamw
    labels = jax.tree.map(lambda on: TRAINABLE if on else FROZEN, mask)
    return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)
