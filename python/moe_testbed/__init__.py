"""moe_testbed: the MoE Routing Testbed (data, model, trainer, metrics, reports)."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("moe-testbed")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
