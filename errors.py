"""ember's errors: each says what failed, where, and what the user can do about it."""


class EmberError(Exception):
    """Base of every error ember raises on purpose."""


class CompileError(EmberError):
    """A model could not be captured or lowered."""


class InputError(EmberError, ValueError):
    """A compiled program was called with inputs of the wrong number, shape, dtype or device."""


class PlanError(EmberError):
    """A planning pass could not produce a valid plan."""


class ArtifactError(EmberError):
    """A saved program is missing, corrupt, or from an incompatible version."""


class ExportError(EmberError):
    """A program could not be written in another format (ONNX): an op it cannot express, or a failed check."""
