"""ember's IR: typed values, nodes in topological order, and the op table that defines every op."""
from .graph import Graph, Node, Value
from .layout import ALIGNMENT, Arena, ArenaLayout
from .ops import OP_TABLE, OpDef
from .types import SUPPORTED_DTYPES, TensorType
from .verify import VerifyError, verify

__all__ = ["ALIGNMENT", "Arena", "ArenaLayout", "Graph", "Node", "Value", "OP_TABLE", "OpDef", "SUPPORTED_DTYPES", "TensorType", "VerifyError", "verify"]
