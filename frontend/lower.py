"""Lower an ATen-level FX graph (from torch.export or aot_autograd) to an ember Graph.

Ops in the op table become native nodes, any other torch op an `extern` node that calls it, so a
model always lowers. Scalars known at capture time are folded into attrs; asserts are dropped.
"""
from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from ..errors import CompileError
from ..ir import Graph, Node, TensorType, Value
from ..ir.ops import OP_TABLE, op_name, qualified_name
from ..ir.schema import split_arguments
from ..ir.types import SUPPORTED_DTYPES, type_of


class SymbolicShapeError(CompileError):
    """The FX graph has symbolic sizes; it must be specialised to concrete shapes first."""


DROPPED = frozenset(
    {"_assert_tensor_metadata", "_assert_async", "_assert_async.msg", "_assert_scalar", "sym_constrain_range",
     "sym_constrain_range_for_size", "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size"}
)
"""Runtime checks with no outputs: they constrain capture, not computation."""

ATTENTION_VARIANTS = frozenset(
    {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
)
"""Backend-specific attention kernels that autograd picks; ember sees them as one attention op."""

GROUPED_MATMULS = frozenset({"transformers.grouped_mm_fallback.default", "aten._grouped_mm.default",
                             "ember.grouped_mm.default"})
"""Grouped expert matmuls: transformers' MoE layers (CPU fallback and the ATen kernel), and ember's own op."""


def lower_fx(gm: fx.GraphModule, weights: Mapping[str, torch.Tensor]) -> Graph:
    """Build an ember Graph from an ATen FX graph whose nodes carry `meta["val"]`.

    `weights` maps placeholder names to the parameter, buffer or constant tensor they stand for;
    every other placeholder is a user input. get_attr tensors become weights too.
    """
    return _Lowering(gm, weights).run()


class _Lowering:
    """The state of one lowering: FX node -> ember value names (or folded constants)."""

    def __init__(self, gm: fx.GraphModule, weights: Mapping[str, torch.Tensor]):
        self.gm = gm
        self.weights = dict(weights)
        self.env: dict[fx.Node, Any] = {}
        self.inputs: list[Value] = []
        self.params: list[Value] = []
        self.nodes: list[Node] = []

    def run(self) -> Graph:
        outputs: tuple[str, ...] = ()
        for fx_node in self.gm.graph.nodes:
            if fx_node.op == "placeholder":
                self._placeholder(fx_node)
            elif fx_node.op == "get_attr":
                self._get_attr(fx_node)
            elif fx_node.op == "call_function":
                self._call(fx_node)
            elif fx_node.op == "output":
                outputs = self._outputs(fx_node)
            else:
                raise CompileError(f"node {fx_node.name}: FX op {fx_node.op!r} is not supported at the ATen level")
        weights = {value.name: self.weights[value.name] for value in self.params}
        return Graph(tuple(self.inputs), tuple(self.params), tuple(self.nodes), outputs, weights)

    # -- sources -----------------------------------------------------------------------------
    def _placeholder(self, fx_node: fx.Node) -> None:
        value = fx_node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            self.env[fx_node] = _scalar(fx_node, value)
            return
        typed = Value(fx_node.name, _tensor_type(fx_node, value))
        (self.params if fx_node.name in self.weights else self.inputs).append(typed)
        self.env[fx_node] = fx_node.name

    def _get_attr(self, fx_node: fx.Node) -> None:
        tensor = operator.attrgetter(fx_node.target)(self.gm)
        if not isinstance(tensor, torch.Tensor):
            raise CompileError(f"node {fx_node.name}: get_attr {fx_node.target} is a {type(tensor).__name__}, not a tensor")
        self.weights[fx_node.name] = tensor
        self.params.append(Value(fx_node.name, type_of(tensor)))
        self.env[fx_node] = fx_node.name

    # -- ops ---------------------------------------------------------------------------------
    def _call(self, fx_node: fx.Node) -> None:
        target = fx_node.target
        value = fx_node.meta.get("val")
        if target is operator.getitem:
            source = self.env[fx_node.args[0]]
            self.env[fx_node] = source[fx_node.args[1]]
            return
        if not isinstance(target, torch._ops.OpOverload):
            if _is_scalar(value):
                self.env[fx_node] = _scalar(fx_node, value)
                return
            raise CompileError(
                f"node {fx_node.name}: {getattr(target, '__name__', target)} is not a torch op "
                f"and ember cannot call it{_where(fx_node)}"
            )
        name = op_name(target)
        if name in DROPPED:
            return
        if _is_scalar(value):
            self.env[fx_node] = _scalar(fx_node, value)
            return
        qualified = qualified_name(target)
        if name in ATTENTION_VARIANTS and target.namespace == "aten" and self._only_first_output_used(fx_node):
            self._emit(fx_node, "scaled_dot_product_attention", *self._attention_call(fx_node), value_override=value[0])
            self.env[fx_node] = [self.env[fx_node]]  # read back through getitem(·, 0)
            return
        args, kwargs = self._substitute(fx_node.args), self._substitute(fx_node.kwargs)
        if qualified in GROUPED_MATMULS and _is_plain_grouped_mm(fx_node, args, kwargs):
            self._emit(fx_node, "grouped_mm", *split_arguments(OP_TABLE["grouped_mm"].schema, args[:3], {}, _is_name))
            return
        inputs, attrs = split_arguments(target._schema, args, kwargs, _is_name)
        native = target.namespace == "aten" and name in OP_TABLE and self._dtypes_supported(fx_node, inputs)
        if native:
            self._emit(fx_node, name, inputs, attrs)
        else:
            self._emit(fx_node, "extern", inputs, attrs, target=qualified)

    def _emit(self, fx_node: fx.Node, op: str, inputs: list[str], attrs: dict[str, Any], *,
              target: str | None = None, value_override: Any = None) -> None:
        value = fx_node.meta.get("val") if value_override is None else value_override
        if value is None:
            raise CompileError(f"node {fx_node.name} ({fx_node.target}) has no recorded output type{_where(fx_node)}")
        results = value if isinstance(value, (tuple, list)) else (value,)
        if not all(result is None or isinstance(result, torch.Tensor) for result in results):
            raise CompileError(f"node {fx_node.name} ({fx_node.target}) returns non-tensor values{_where(fx_node)}")
        names = self._output_names(fx_node, len(results)) if isinstance(value, (tuple, list)) else [fx_node.name]
        present = tuple(i for i, result in enumerate(results) if result is not None)
        outputs = tuple(Value(names[i], _tensor_type(fx_node, results[i])) for i in present)
        positions = None if present == tuple(range(len(results))) else present
        self.nodes.append(Node(fx_node.name, op, tuple(inputs), attrs, outputs, target, _source_line(fx_node), positions))
        if isinstance(value, (tuple, list)):
            self.env[fx_node] = [names[i] if results[i] is not None else None for i in range(len(results))]
        else:
            self.env[fx_node] = fx_node.name

    def _output_names(self, fx_node: fx.Node, count: int) -> list[str]:
        """Name output i after the getitem that reads it, so the IR reads like the FX graph."""
        names = [f"{fx_node.name}_{index}" for index in range(count)]
        for user in fx_node.users:
            if user.target is operator.getitem and isinstance(user.args[1], int):
                names[user.args[1]] = user.name
        return names

    def _outputs(self, fx_node: fx.Node) -> tuple[str, ...]:
        flat = torch.utils._pytree.tree_leaves(fx_node.args[0])
        names = []
        for item in flat:
            if not isinstance(item, fx.Node) or not isinstance(self.env.get(item), str):
                raise CompileError(f"graph output {item!r} is not a tensor; ember programs return tensors only")
            names.append(self.env[item])
        return tuple(names)

    # -- helpers -----------------------------------------------------------------------------
    def _substitute(self, tree: Any) -> Any:
        """FX nodes in args -> value names (tensors) or folded constants (scalars)."""
        return torch.fx.node.map_arg(tree, lambda node: self.env[node])

    def _dtypes_supported(self, fx_node: fx.Node, inputs: list[str]) -> bool:
        value = fx_node.meta.get("val")
        results = value if isinstance(value, (tuple, list)) else (value,)
        dtypes = [r.dtype for r in results if isinstance(r, torch.Tensor)]
        dtypes += [input_node.meta["val"].dtype for input_node in fx_node.all_input_nodes
                   if isinstance(input_node.meta.get("val"), torch.Tensor)]
        return all(dtype in SUPPORTED_DTYPES for dtype in dtypes)

    def _only_first_output_used(self, fx_node: fx.Node) -> bool:
        return all(user.target is operator.getitem and user.args[1] == 0 for user in fx_node.users)

    def _attention_call(self, fx_node: fx.Node) -> tuple[list[str], dict[str, Any]]:
        """The arguments of a backend attention variant, restated as scaled_dot_product_attention."""
        bound = _bind(fx_node.target._schema, self._substitute(fx_node.args), self._substitute(fx_node.kwargs))
        mask = bound.get("attn_mask", bound.get("attn_bias"))
        kwargs = {"attn_mask": mask, "dropout_p": bound.get("dropout_p", 0.0),
                  "is_causal": bound.get("is_causal", False), "scale": bound.get("scale")}
        sdpa = OP_TABLE["scaled_dot_product_attention"].schema
        return split_arguments(sdpa, [bound["query"], bound["key"], bound["value"]], kwargs, _is_name)



def _is_plain_grouped_mm(fx_node: fx.Node, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """2-D input, 3-D per-expert weights, offsets given, no bias or dtype change: ember's grouped_mm.

    aten._grouped_mm's 2-D x 2-D and 3-D x 3-D forms group along other dimensions and stay externs.
    """
    if len(args) < 3 or args[2] is None or any(item is not None for item in (*args[3:], *kwargs.values())):
        return False
    x, weight = (node.meta.get("val") for node in fx_node.args[:2])
    return isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == 2 and weight.dim() == 3


def _bind(schema: torch._C.FunctionSchema, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Argument name -> value, defaults filled in."""
    bound = {}
    for position, argument in enumerate(schema.arguments):
        if position < len(args) and not argument.kwarg_only:
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _is_name(value: Any) -> bool:
    return isinstance(value, str)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _scalar(fx_node: fx.Node, value: Any) -> Any:
    """A scalar known at capture time; symbolic ones need the graph specialised first."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise SymbolicShapeError(
            f"node {fx_node.name} is a number only known at run time ({value}{_source(fx_node)}), such as a "
            "tensor's .item() or int(tensor): ember.compile needs static shapes and tensor results, so keep it a "
            "tensor, or use torch.compile(model, backend=\"ember\"), which runs such code eagerly")
    if value is None or isinstance(value, (int, float, bool)):
        return value
    raise CompileError(f"input {fx_node.name} is a {type(value).__name__}; ember takes tensors and Python scalars")


def _source(fx_node: fx.Node) -> str:
    """"; file:line `code`" for the model's source line where the trace recorded it, else nothing."""
    trace = (fx_node.meta.get("stack_trace") or "").strip().splitlines()
    where = re.match(r'\s*File "(.*)", line (\d+)', trace[-2]) if len(trace) >= 2 else None
    return f"; {where[1]}:{where[2]} `{trace[-1].strip()}`" if where else ""


def _tensor_type(fx_node: fx.Node, value: torch.Tensor) -> TensorType:
    try:
        return type_of(value)
    except TypeError:
        raise SymbolicShapeError(f"node {fx_node.name} has symbolic shape {tuple(value.shape)}") from None


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _source_line(fx_node: fx.Node) -> str | None:
    """`file:line (code)` of the model line that produced this node, when torch recorded it."""
    trace = fx_node.meta.get("stack_trace")
    frames = _FRAME.findall(trace or "")
    if not frames:
        return None
    path, line, _, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} ({code.strip()})"


def _where(fx_node: fx.Node) -> str:
    source = _source_line(fx_node)
    return f", at {source}" if source else ""
