"""ember's frontends: torch.export for offline compilation, aot_autograd for the torch.compile backend."""
from .export import Captured, from_module
from .lower import lower_fx

__all__ = ["Captured", "from_module", "lower_fx"]
