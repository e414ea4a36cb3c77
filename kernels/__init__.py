"""Fused ops of the SoundStorm engine: a PyTorch reference for each, faster backends
tested against it, and `get_ops`, the single point where a backend is chosen."""

from soundstorm.kernels.dispatch import Ops, available_backends, get_ops

__all__ = ["Ops", "available_backends", "get_ops"]
