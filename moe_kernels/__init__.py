"""moe_kernels: fast Mixture-of-Experts building blocks for PyTorch.

Ops (``moe_kernels.ops``): ``topk_gating``, ``route`` -> ``RoutingPlan``, ``dispatch``,
``grouped_mm``, ``combine``, ``routing_histogram``; each a ``torch.library`` custom op with a
plain-torch reference and an ordered list of backends (cuda, triton, cpu, reference).

Modules: ``MoE`` (the layer), ``GroupedExperts`` (its routed experts, usable on their own with
any routing decision), ``moe_kernels.routers`` (one class per router kind), ``MoEConfig``.
"""

from __future__ import annotations

from moe_kernels import stats
from moe_kernels._first_use import install as _install_first_use_check
from moe_kernels.config import MoEConfig
from moe_kernels.experts import GroupedExperts
from moe_kernels.layer import MoE, aux_losses, share_router, update_routers
from moe_kernels.ops import (
    NoBackendError,
    RoutingPlan,
    combine,
    dispatch,
    grouped_mm,
    route,
    routing_histogram,
    topk_gating,
)

_install_first_use_check()

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled core was built with: cpu, cuda (+ archs, nvcc), compilers, cutlass."""
    from moe_kernels.ops._select import _C, _C_IMPORT_ERROR

    if _C is None:
        return {"cpu": False, "cuda": False, "error": _C_IMPORT_ERROR}
    return dict(_C.build_info())


__all__ = [
    "GroupedExperts",
    "MoE",
    "MoEConfig",
    "aux_losses",
    "share_router",
    "stats",
    "update_routers",
    "NoBackendError",
    "RoutingPlan",
    "build_info",
    "combine",
    "dispatch",
    "grouped_mm",
    "route",
    "routing_histogram",
    "topk_gating",
]
