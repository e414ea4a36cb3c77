"""The XLA path: the same checkpoint in JAX, the whole decode as one jitted program
(TPU, or CPU here), Pallas kernels, rows sharded over a device mesh.

Needs JAX (`pip install 'soundstorm[xla]'`); importing this package without it raises
a RuntimeError saying so."""

from soundstorm.engine.xla.engine import XlaEngine, require_jax

require_jax()

__all__ = ["XlaEngine", "require_jax"]
