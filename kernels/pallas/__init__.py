"""Pallas kernels (TPU) for the XLA path, `soundstorm.engine.xla`: each with its `jnp`
reference in the same file, run with `interpret=True` on machines without a TPU."""
