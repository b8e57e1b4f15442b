"""ember's optimizer: passes over the IR, ordered by the pipeline."""
from .pipeline import PIPELINE, REORDER

__all__ = ["PIPELINE", "REORDER"]
