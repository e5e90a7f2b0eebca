"""DisagFusion: diffusion models served as a disaggregated pipeline (encoder → DiT → decoder)."""

__version__ = "0.1.0"
