"""meshsshd: the mesh peer daemon with an embedded SSH server."""

__version__ = "0.1.0"
