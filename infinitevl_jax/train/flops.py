"""Model FLOPs of a training step, per text token, and the MFU they imply.

"Model FLOPs" follow PaLM (Chowdhery et al. 2022, appendix B): the arithmetic the model needs,
whatever the implementation does; rematerialisation (``remat``) recompute is *not* counted, so
MFU does not reward recomputing. One multiply-add is 2 FLOPs. Only matrix products count
(norms, RoPE, softmax, gates, the loss and the optimiser are elementwise and left out). The
vision tower (ViT + merger) is left out too: the counts are per *text-decoder* token, with a
text-only batch in mind; images add the ViT's work on top.

Forward of the decoder, per token, for a sequence of T tokens (D width, V vocab):

    F = sum over layers l of [ 2 P_mixer(l) + C_mixer(l) + 2 P_mlp ] + 2 D V

- ``P_*``: weights that multiply a token's activations once each: dense kernels (biases,
  norm scales, ``A_log``, ``dt_bias`` are elementwise and excluded) and the GDN's depthwise conv
  kernels (each tap is one multiply-add per token, like a matmul weight). ``P_mlp = 3 D I``.
  The embedding lookup is a gather (0 FLOPs); the LM head ``2 D V`` is counted, tied or not.
- Softmax attention (``H`` query heads of ``Dh``): ``C = 2 * 2 * H * Dh * ctx`` (``Q K^T`` and
  ``P V``), where ``ctx`` is the mean number of keys a query attends to: ``(T + 1) / 2`` for full
  causal attention, and for a sliding window of W keys (the query included) the exact mean of
  ``min(t + 1, W)`` over ``t < T``, i.e. ``(T + 1) / 2`` if ``T <= W`` else
  ``(W (W + 1) / 2 + (T - W) W) / T``. GQA does not change it (the work is per query head).
  A packed row is counted as one sequence of T tokens (attention across its segments is masked,
  so this is an upper bound for packed rows; the benchmark uses one document per row).
- Gated DeltaNet, chunked WY/UT form (``ops/delta_rule/chunked.py``, chunk ``c = 64``, per head
  ``d_k = K``, ``d_v = Vh``, state ``K x Vh``), per chunk and head, with dense ``c x c`` tiles
  (as every implementation computes them; masks are elementwise):

      A = K K^T                      2 c^2 K
      (I + A)^-1 (unit lower-tri.)   c^3 / 3
      W = M diag(.) K                2 c^2 K
      U = M diag(.) V                2 c^2 Vh
      V' = U - W S                   2 c K Vh
      S <- d S + K_out^T V'          2 c K Vh
      O  = Q_in S                    2 c K Vh
      Q K^T (intra-chunk)            2 c^2 K
      (Q K^T * decay) V'             2 c^2 Vh

  so per token and head ``C_head = 6 K Vh + c (6 K + 4 Vh) + c^2 / 3`` (the token recurrence
  alone would be ``6 K Vh``: read ``S^T k``, write ``k u^T``, read ``S^T q``), and
  ``C_mixer = H_gdn * C_head`` (312.7 kFLOP per token-head for InfiniteVL's K 128, Vh 256, as
  in spec/kernels.md section 6). The cumulative-decay sum (a ``c x c`` ones-matrix product in our
  code) is a prefix sum, not model arithmetic, and is left out; so is the extra work of our
  block-doubling inverse over ``c^3 / 3``.

Training step (``train_flops_per_token``), full-model stages (SFT, logit distillation):

    total = F_student + B_act + 2 * trainable_params (+ F_teacher)
    B_act = F_student + sum over layers of C_mixer(l)

The activation gradients of every matmul ``X W`` cost its forward (``dX = dY W^T``); the mixer
cores multiply two activations, both of which need gradients, so their backward costs twice
their forward (PaLM's ``12 L H Q T`` = 3 x the attention forward). Weight gradients
(``dW = X^T dY``, 2 FLOPs per weight per token) exist only for the trainable subset, since the
trainer differentiates that subset alone (``train.step``); biases and other elementwise weights
are counted at the same 2 per token, a negligible excess. Autodiff also skips the input
gradients below the lowest trainable weight (e.g. of layer 0's q/k/v projections, whose input is
the frozen embedding), which this count includes: < 1 % of the total for InfiniteVL-4B's
stages. The teacher of a distillation stage adds its own forward (head included).

Layer-wise distillation (``layerwise=True``, ``train.layerwise``): the teacher runs once without
its head (``residual_stream``), then every student layer runs once on the teacher's input to
that layer (no student head, no final norm). Gradients flow only inside layers holding trainable
weights (``trainable_layer_types``; the stage trains the GDN mixers): back through the MLP, the
mixer's output-side weights (``o_proj`` and the convs) and its core, but not into the teacher's
input, so the input projections (q/k/v/g/a/b) need weight gradients only:

    total = F_teacher(no head) + sum_l F_layer(l)
            + sum over trained layers of [ 2 P_mlp + 2 (P_mixer - P_in) + 2 C_mixer ] + 2 * trainable_params
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from infinitevl_jax.models.config import LAYER_TYPES, MMATE_TYPES, DecoderConfig, VisionLanguageConfig

GDN_CHUNK = 64  # ops.delta_rule.chunked.CHUNK_SIZE (not imported: this module needs no jax)


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per token of one decoder layer.

    input_proj: ``2 x`` weights of the mixer maps reading the layer's (normed) input: q/k/v for
      attention, q/k/v/g/a/b for GDN; other_proj: ``2 x`` the rest of the mixer's weights
      (``o_proj``; the GDN's conv kernels); core: the mixer's parameter-free products
      (attention or the delta rule); mlp: ``2 x 3 D I``.
    """

    input_proj: float
    other_proj: float
    core: float
    mlp: float

    @property
    def forward(self) -> float:
        return self.input_proj + self.other_proj + self.core + self.mlp


def attention_context(seq_len: int, window: int | None = None) -> float:
    """Mean keys per query of causal attention over ``seq_len`` tokens: ``mean_t min(t + 1, W)``
    for ``t < seq_len`` (``window=None``: unbounded, ``(T + 1) / 2``)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")
    t = seq_len
    if window is None or t <= window:
        return (t + 1) / 2
    if window < 1:
        raise ValueError(f"window must be >= 1 or None; got {window}")
    return (window * (window + 1) / 2 + (t - window) * window) / t


def gdn_core_flops_per_token_head(d_k: int, d_v: int, chunk: int = GDN_CHUNK) -> float:
    """Chunked gated delta rule per token and head: ``6 K V + c (6 K + 4 V) + c^2 / 3`` (module
    docstring)."""
    return 6 * d_k * d_v + chunk * (6 * d_k + 4 * d_v) + chunk ** 2 / 3


def _mixer_params(dec: DecoderConfig, layer_type: str) -> tuple[int, int]:
    """(input-side, output-side) matmul-like weights of one mixer."""
    d = dec.hidden_size
    if layer_type == "linear_attention":
        g = dec.gdn
        key_dim, value_dim = g.num_heads * g.head_k_dim, g.num_heads * g.head_v_dim
        inputs = d * (2 * key_dim + 2 * value_dim + 2 * g.num_heads)  # q, k, v, g, a, b
        outputs = value_dim * d + g.conv_size * (2 * key_dim + value_dim)  # o_proj, q/k/v convs
        return inputs, outputs
    q_dim, kv_dim = dec.num_attention_heads * dec.head_dim, dec.num_key_value_heads * dec.head_dim
    if layer_type in ("sliding_attention", "full_attention"):
        return d * (q_dim + 2 * kv_dim), q_dim * d
    if layer_type in MMATE_TYPES:
        heads = dec.num_attention_heads
        # Flex-MA x, B, C, z, dt, dir; the mix; Local-Swin q, k, v
        inputs = d * (2 * kv_dim + 2 * q_dim + 4 * heads + 1) + d * (q_dim + 2 * kv_dim)
        outputs = 2 * q_dim * d + dec.mmate.conv_size * (2 * kv_dim + q_dim)  # out_proj, o_proj, convs
        return inputs, outputs
    raise ValueError(f"unknown layer type {layer_type!r}")


def ssd_core_flops_per_token_head(d_state: int, head_dim: int, chunk: int = GDN_CHUNK) -> float:
    """Chunked SSD scan (one direction) per token and head: ``2 c (N + P) + 4 N P`` (the chunk's
    C B^T and its product with x, the chunk state and the state read)."""
    return 2 * chunk * (d_state + head_dim) + 4 * d_state * head_dim


def layer_flops(dec: DecoderConfig, layer_type: str, seq_len: int) -> LayerFlops:
    """Forward FLOPs per token of one layer of ``layer_type`` in a ``seq_len``-token sequence."""
    inputs, outputs = _mixer_params(dec, layer_type)
    if layer_type == "linear_attention":
        g = dec.gdn
        core = g.num_heads * gdn_core_flops_per_token_head(g.head_k_dim, g.head_v_dim)
    elif layer_type in MMATE_TYPES:  # both scan directions + Local-Swin as text-window attention
        ssd = 2 * dec.num_attention_heads * ssd_core_flops_per_token_head(dec.head_dim, dec.head_dim)
        core = ssd + 2 * 2 * dec.num_attention_heads * dec.head_dim * attention_context(seq_len, dec.mmate.text_window)
    else:
        ctx = attention_context(seq_len, dec.window_of(layer_type))
        core = 2 * 2 * dec.num_attention_heads * dec.head_dim * ctx
    return LayerFlops(input_proj=2.0 * inputs, other_proj=2.0 * outputs, core=float(core),
                      mlp=2.0 * 3 * dec.hidden_size * dec.intermediate_size)


def matmul_params(dec: DecoderConfig, *, head: bool = True) -> int:
    """Weights entering the ``2 x params`` count: every layer's mixer kernels (+ GDN conv
    kernels) and MLP kernels, plus the head ``D x V`` (the embedding matrix when tied)."""
    total = sum(sum(_mixer_params(dec, t)) + 3 * dec.hidden_size * dec.intermediate_size for t in dec.layer_types)
    return total + (dec.hidden_size * dec.vocab_size if head else 0)


def head_flops(dec: DecoderConfig) -> float:
    """LM head per token: ``2 D V``."""
    return 2.0 * dec.hidden_size * dec.vocab_size


def forward_flops_per_token(dec: DecoderConfig, seq_len: int, *, head: bool = True) -> float:
    """The decoder's forward per token, ``F`` of the module docstring (``head=False``: without
    the LM head, as in the layer-wise stage)."""
    return (sum(layer_flops(dec, t, seq_len).forward for t in dec.layer_types)
            + (head_flops(dec) if head else 0.0))


def train_flops_breakdown(cfg: VisionLanguageConfig, seq_len: int, *, trainable_params: int,
                          teacher: VisionLanguageConfig | None = None, layerwise: bool = False,
                          trainable_layer_types: Sequence[str] = ("linear_attention",)) -> dict[str, float]:
    """The terms of ``train_flops_per_token`` (FLOPs per token): ``student_forward``,
    ``activation_grads``, ``weight_grads``, ``teacher_forward`` and their ``total``."""
    if trainable_params < 0:
        raise ValueError(f"trainable_params must be >= 0; got {trainable_params}")
    dec = cfg.decoder
    layers = [(t, layer_flops(dec, t, seq_len)) for t in dec.layer_types]
    if layerwise:
        if teacher is None:
            raise ValueError("the layer-wise stage needs the teacher's config (its forward feeds every layer)")
        if teacher.decoder.num_layers != dec.num_layers:
            raise ValueError(f"layer-wise distillation pairs layers: teacher has {teacher.decoder.num_layers}, "
                             f"student {dec.num_layers}")
        unknown = sorted(set(trainable_layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"unknown trainable_layer_types {unknown}")
        student = sum(f.forward for _, f in layers)
        activation = sum(f.mlp + f.other_proj + 2 * f.core for t, f in layers if t in trainable_layer_types)
        teacher_forward = forward_flops_per_token(teacher.decoder, seq_len, head=False)
    else:
        student = forward_flops_per_token(dec, seq_len)
        activation = student + sum(f.core for _, f in layers)
        teacher_forward = 0.0 if teacher is None else forward_flops_per_token(teacher.decoder, seq_len)
    weights = 2.0 * trainable_params
    return dict(student_forward=student, activation_grads=activation, weight_grads=weights,
                teacher_forward=teacher_forward, total=student + activation + weights + teacher_forward)


def train_flops_per_token(cfg: VisionLanguageConfig, seq_len: int, *, trainable_params: int,
                          teacher: VisionLanguageConfig | None = None, layerwise: bool = False,
                          trainable_layer_types: Sequence[str] = ("linear_attention",)) -> float:
    """Model FLOPs of one training step per text token (module docstring for every term).

    Args:
      cfg: the student (for SFT: the model trained).
      seq_len: tokens per row T (attention context).
      trainable_params: weights the step differentiates (``train.trainable`` mask's size).
      teacher: the distillation teacher's config, adding its forward (with head; without it
        when ``layerwise``); None for SFT.
      layerwise: the layer-wise distillation stage (teacher forward, every student layer once on
        the teacher's inputs, no student head).
      trainable_layer_types: layerwise only: layer types whose mixers are trained (gradients
        flow only inside those layers).
    """
    return train_flops_breakdown(cfg, seq_len, trainable_params=trainable_params, teacher=teacher,
                                 layerwise=layerwise, trainable_layer_types=trainable_layer_types)["total"]


# Dense bf16 (no sparsity) peak per device, by a substring of the normalised device kind (lower
# case, spaces/-/_ removed); the first match wins, so specific names precede the ones they contain.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.4e12),
    ("h200nvl", 835.5e12),
    ("h100nvl", 835.5e12),
    ("h100pcie", 756.0e12),
    ("h800pcie", 756.0e12),
    ("h200", 989.4e12),
    ("h100", 989.4e12),
    ("h800", 989.4e12),
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362.05e12),
    ("l40", 181.05e12),
    ("l4", 121e12),
    ("tpuv2", 45e12),
    ("tpuv3", 123e12),
    ("v4lite", 137.5e12),
    ("tpuv4", 275e12),
    ("v5lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpuv5", 459e12),  # v5p reports its kind as "TPU v5"
    ("v6lite", 918e12),
    ("v6e", 918e12),
    ("tpu7x", 2307e12),
)


def peak_flops_per_device(device) -> float | None:
    """Dense bf16 peak FLOP/s of a ``jax.Device`` from its ``device_kind`` (``PEAK_BF16_FLOPS``);
    None on the CPU or for an unknown kind."""
    if getattr(device, "platform", "").lower() == "cpu":
        return None
    kind = re.sub(r"[\s_\-]+", "", str(getattr(device, "device_kind", "")).lower())
    if not kind or kind == "cpu":
        return None
    for needle, peak in PEAK_BF16_FLOPS:
        if needle in kind:
            return peak
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak_per_device: float | None,
        num_devices: int) -> float | None:
    """Model FLOPs utilisation: ``tokens/s * FLOPs/token / (peak per device * devices)``; None
    when the peak is unknown."""
    if peak_per_device is None or peak_per_device <= 0 or num_devices < 1:
        return None
    return tokens_per_second * flops_per_token / (peak_per_device * num_devices)
