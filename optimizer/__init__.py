"""ember's optimizer: passes over the IR, ordered by the pipeline."""
from .pipeline import PIPELINE

__all__ = ["PIPELINE"]
