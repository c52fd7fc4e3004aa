"""The functional op contract of moe_kernels (see each module's legend)."""

from moe_kernels.ops._select import NoBackendError
from moe_kernels.ops.combine import combine
from moe_kernels.ops.dispatch import dispatch
from moe_kernels.ops.grouped_mm import grouped_mm
from moe_kernels.ops.route import DROPS, RoutingPlan, route
from moe_kernels.ops.routing_histogram import routing_histogram
from moe_kernels.ops.topk_gating import SCORES, router_scores, topk_gating

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
