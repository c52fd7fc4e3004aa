"""The functional op contract of moe_kernels (see each module's legend).

One module per op family, named like its public function: ``topk_gating``, ``route``,
``dispatch_combine`` (the adjoint pair ``dispatch`` / ``combine``), ``grouped_mm``,
``routing_histogram``; backend selection and the backward rule live in ``_select``.
"""

from moe_kernels.ops._select import NoBackendError
from moe_kernels.ops.dispatch_combine import combine, dispatch
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
