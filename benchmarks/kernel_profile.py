"""Device kernels of a jitted call, from a ``jax.profiler`` trace (shared by the GPU profiles).

``profile(name, run, calls)`` times ``run()`` (which blocks) untraced, then traces ``calls`` more
and sums the device events by kernel name: wall ms, device-busy ms (the sum of kernel times),
kernels per call, the top kernels and (``kernels``) every kernel's time. Given the compiled
program's HLO text (``jitted.lower(*args).compile().as_text()``), each top kernel also names the
JAX operation its
XLA fusion came from (the ``op_name`` metadata), e.g. ``transpose(jvp())/reduce_sum``, and
``by_kind`` sums the kernel time per ``kernel_kind``: GEMMs, cuDNN attention, Pallas/Triton
kernels (custom calls) and XLA's other fusions by the primitive that ends their ``op_name``.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

TOP_KERNELS = 25
GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas")
CUDNN_MARKERS = ("cudnn", "fmha", "flash")


def device_events(trace_dir: str) -> list[tuple[str, float]]:
    """``(kernel name, ns)`` of every device event (one with an ``hlo_op``) in the trace under
    ``trace_dir``. GPU: kernel events of the device planes' stream lines; CPU: XLA op events of
    the host's XLA threads."""
    import jax

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    events = []
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        on_gpu = plane.name.startswith("/device:GPU")
        if not (on_gpu or plane.name == "/host:CPU"):
            continue
        for line in plane.lines:
            if on_gpu and not line.name.startswith("Stream"):
                continue  # the "XLA Modules"/"XLA Ops" lines span the same kernels
            for event in line.events:
                if "hlo_op" in dict(event.stats):
                    events.append((event.name, event.duration_ns))
    return events


def fusion_ops(hlo_text: str) -> dict[str, str]:
    """Kernel name -> ``op_name`` of the HLO instruction it runs. The GPU trace names a fusion's
    kernel after the instruction with dots as underscores (``%gemm_fusion_dot.56`` runs as
    ``gemm_fusion_dot_56``; the CPU's as is)."""
    ops = {}
    for match in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.MULTILINE):
        ops.setdefault(match.group(1).replace(".", "_"), match.group(2))
        ops.setdefault(match.group(1), match.group(2))  # the CPU trace keeps the instruction's name
    return ops


def kernel_kind(kernel: str, op_name: str) -> str:
    """A coarse label for where a kernel's time goes: ``gemm``, ``cudnn attention``, ``xla: <primitive>``
    (the last ``/`` part of the fusion's ``op_name``, e.g. ``xla: concatenate``), or ``custom:
    <kernel>`` for kernels with no XLA fusion behind them (Pallas/Triton kernels)."""
    lowered = kernel.lower()
    if any(marker in lowered for marker in GEMM_MARKERS):
        return "gemm"
    if any(marker in lowered for marker in CUDNN_MARKERS):
        return "cudnn attention"
    if op_name:
        return "xla: " + re.sub(r"\[.*$", "", op_name.rsplit("/", 1)[-1])
    return "custom: " + kernel[:60]


def profile(name: str, run, calls: int, hlo_text: str | None = None) -> dict:
    """Wall ms per call of ``run()`` (which blocks), then its device kernels per call under a
    trace; with ``hlo_text``, each top kernel's source op (``fusion_ops``)."""
    import jax

    run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    wall_ms = (time.perf_counter() - start) / calls * 1e3
    trace_dir = tempfile.mkdtemp(prefix=f"profile_{name}_")
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            run()
    events = device_events(trace_dir)
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    for kernel, ns in events:  # by kernel: XLA's command buffers (CUDA graphs) put many under one hlo_op
        entry = by_kernel[kernel]
        entry[0] += ns
        entry[1] += 1
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
    busy_ms = sum(ns for _, ns in events) / calls / 1e6
    ops = fusion_ops(hlo_text) if hlo_text else {}
    by_kind = collections.Counter()
    for kernel, (ns, _) in by_kernel.items():
        by_kind[kernel_kind(kernel, ops.get(kernel, ""))] += ns / calls / 1e3
    return dict(workload=name, wall_ms=wall_ms, busy_ms=busy_ms, kernels_per_call=len(events) / calls,
                by_kind=[dict(kind=kind, us_per_call=us) for kind, us in by_kind.most_common(TOP_KERNELS)],
                top=[dict(kernel=kernel[:90], us_per_call=ns / calls / 1e3, launches_per_call=n / calls,
                          op=ops.get(kernel, "")[:120])
                     for kernel, (ns, n) in ranked[:TOP_KERNELS]],
                kernels=[dict(kernel=kernel, us_per_call=ns / calls / 1e3, launches_per_call=n / calls)
                         for kernel, (ns, n) in ranked])
