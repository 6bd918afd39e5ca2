"""FLOP counting of ``scaled_dot_product_attention`` for mmengine's complexity analysis.

mmengine 0.10.7's ``FlopAnalyzer`` (``mmengine/analysis``, used by
``get_model_complexity_info`` and mmseg's ``get_flops.py``) has handlers for
``aten::matmul``/``bmm``/``linear``/``_convolution``/... but none for
``aten::scaled_dot_product_attention``. timm's ViT attention and mmseg/mmcv's
fused attention go through that op, so their ``QKᵀ`` and ``AV`` products were
skipped (only a "skipped operator" warning): a ViT's attention FLOPs silently
vanished from every table.

:func:`sdpa_flop_jit` counts them in mmengine's convention (one fused
multiply-add = one flop; softmax, scaling and masking not counted, as for the
unfused ``matmul`` path), so the fused and the manual attention of the same
model give the same count:

    flops = prod(batch dims of q) · L · S · (E + Ev)

for ``q: (..., L, E)``, ``k: (..., S, E)``, ``v: (..., S, Ev)`` — the
``QKᵀ`` product (L·S·E) plus ``AV`` (L·S·Ev). A causal mask is counted as the
full product, like the matmul path. Importing this module registers the
handler (idempotent); :func:`install_sdpa_flop_handler` does it explicitly
(through :func:`kim_plugins.mmseg.compat.register_op_handle`).
"""
from __future__ import annotations

from math import prod
from typing import Any, List

from .compat import register_op_handle

__all__ = ["SDPA_OP", "sdpa_flop_jit", "install_sdpa_flop_handler"]

SDPA_OP = "aten::scaled_dot_product_attention"


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """mmengine jit handle: flops of ``aten::scaled_dot_product_attention(q, k, v, ...)``."""
    from mmengine.analysis.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        raise ValueError("scaled_dot_product_attention with incomplete tensor shapes in the trace; "
                         "trace with concrete inputs")
    if q[-1] != k[-1] or k[-2] != v[-2]:
        raise ValueError(f"inconsistent attention shapes q={q}, k={k}, v={v}")
    length, source = q[-2], k[-2]
    return prod(q[:-2]) * length * source * (q[-1] + v[-1])


def install_sdpa_flop_handler() -> None:
    """Register :func:`sdpa_flop_jit` (and an output-size activation count) as mmengine defaults."""
    register_op_handle(SDPA_OP, sdpa_flop_jit)


install_sdpa_flop_handler()
