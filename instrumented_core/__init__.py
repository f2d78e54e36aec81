"""Observable two-phase pause for vLLM data-parallel engines."""

__version__ = "0.1.0"
