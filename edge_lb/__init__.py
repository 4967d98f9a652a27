"""edge-lb: an edge L4 load balancer (XDP data plane, asyncio control plane)."""

__version__ = "0.1.0"
