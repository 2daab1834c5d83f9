"""CDS Hooks 2.0 service for lumbar spine imaging orders: the HTTP edge and the CDS Hooks protocol."""

__version__ = "0.1.0"
