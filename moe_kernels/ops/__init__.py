"""The functional op contract of moe_kernels (see each module's legend)."""

from moe_kernels.ops._backend import NoBackendError
from moe_kernels.ops.combine import combine
from moe_kernels.ops.dispatch import dispatch
from moe_kernels.ops.gating import SCORES, router_scores, topk_gating
from moe_kernels.ops.grouped_mm import grouped_mm
from moe_kernels.ops.histogram import routing_histogram
from moe_kernels.ops.route import DROPS, RoutingPlan, route

__all__ = [
    "DROPS",
    "SCORES",
    "NoBackendError",
    "RoutingPlan",
    "combine",
    "dispatch",
    "grouped_mm",
    "route",
    "router_scores",
    "routing_histogram",
    "topk_gating",
]
