"""merit-jax: MERIT (Merge-Ready Instruction Tuning) in JAX and Flax.

MERIT splits one instruction-tuning mixture into groups of datasets whose
gradients conflict least, trains one branch per group without communication
and merges the branches with token-count weights. The command-line entry point
is ``merit`` (``merit_jax.cli``). Importing this package does not import JAX.
"""

from importlib import metadata

try:
    __version__ = metadata.version("merit-jax")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
