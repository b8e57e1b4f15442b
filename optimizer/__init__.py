"""ember's optimizer: passes over the IR and the planners after them, in the order of the pipeline."""
from .pipeline import PASSES, REORDER, Compilation, Target, stages

__all__ = ["PASSES", "REORDER", "Compilation", "Target", "stages"]
