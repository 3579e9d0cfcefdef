"""Write an exported ISDA graph at ONNX opset 16 or 17.

torch's dynamo-based exporter writes opset 18 and converts lower with onnx's version converter,
which has no adapter for some operators in ISDA's graph (``Pad`` 18 -> 17) and then keeps opset
18. :func:`downgrade` rewrites the few operators whose opset-18 form the graph uses into their
older standard form, node by node:

* ``Pad``-18, ``Resize``-18, ``Split``-18: the same node as ``Pad``/``Resize``/``Split``-13
  when the opset-18 additions (``axes``, ``antialias``, ``keep_aspect_ratio_policy``,
  ``num_outputs``) are unused (anything else is refused);
* ``Reduce*``-18 (``axes`` as an input) -> ``Reduce*``-13 (``axes`` attribute, from a constant);
* ``LayerNormalization``-17 (opset 16 only): ``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``,
  ``Div``, ``Add`` (the same formula, rounded differently by a few ulps).

Every other node must exist unchanged at the target opset (checked against the ONNX operator
schemas), then ``onnx.checker`` validates the model. The IR version is lowered to 8 (the IR of
opsets 15-17) and the per-node / per-value metadata that only IR 10 has is dropped.
"""
import onnx
from onnx import defs, helper, numpy_helper

__all__ = ["downgrade", "NATIVE_OPSET"]

NATIVE_OPSET = 18
IR_VERSION = {16: 8, 17: 8}
_REDUCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _drop_attrs(node, names):
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)


def _constants(graph):
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_ints":
                    values[node.output[0]] = list(a.ints)
    return values


def _static_shapes(model):
    """value name -> shape (ints, or None for a symbolic dimension) from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {}
    for value in list(g.input) + list(g.output) + list(g.value_info):
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def _static_dim(name, axis, consts, shapes):
    if name in consts:
        shape = list(getattr(consts[name], "shape", [len(consts[name])]))
    else:
        shape = shapes.get(name)
    if not shape:
        return None
    return shape[axis]


def _refuse(node, why):
    raise ValueError(f"cannot write {node.op_type} node {node.name!r} below opset "
                     f"{NATIVE_OPSET}: {why}")


def _layer_norm_nodes(node, target):
    """LayerNormalization(x, scale, bias) -> opset-13 nodes computing the same."""
    a = _attrs(node)
    axis, eps = a.get("axis", -1), a.get("epsilon", 1e-5)
    if axis != -1:
        _refuse(node, f"axis {axis} (only the last axis is rewritten)")
    if any(o for o in node.output[1:]):
        _refuse(node, "its mean / inverse std outputs are used")
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    p = (node.name or node.output[0]) + "/ln"
    out = [
        helper.make_node("ReduceMean", [x], [p + "_mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", [x, p + "_mean"], [p + "_d"]),
        helper.make_node("Mul", [p + "_d", p + "_d"], [p + "_d2"]),
        helper.make_node("ReduceMean", [p + "_d2"], [p + "_var"], axes=[-1], keepdims=1),
        helper.make_node("Constant", [], [p + "_eps"],
                         value=helper.make_tensor(p + "_eps", onnx.TensorProto.FLOAT, [],
                                                  [float(eps)])),
        helper.make_node("Add", [p + "_var", p + "_eps"], [p + "_ve"]),
        helper.make_node("Sqrt", [p + "_ve"], [p + "_std"]),
        helper.make_node("Div", [p + "_d", p + "_std"], [p + "_n"]),
        helper.make_node("Mul", [p + "_n", scale], [p + "_s" if bias else node.output[0]]),
    ]
    if bias:
        out.append(helper.make_node("Add", [p + "_s", bias], [node.output[0]]))
    return out


def downgrade(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` (opset 18, default domain only) rewritten for opset ``target`` (16 or 17);
    modified in place and returned. Raises ValueError for a node it cannot express."""
    if target >= NATIVE_OPSET:
        return model
    if target not in IR_VERSION:
        raise ValueError(f"opset {target} is not supported (16, 17 or >= {NATIVE_OPSET})")
    if model.functions:
        raise ValueError("the model holds ONNX functions; export with optimize=True (inlined)")
    graph = model.graph
    consts = _constants(graph)
    shapes = _static_shapes(model)
    nodes = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            _refuse(node, f"custom domain {node.domain!r}")
        op = node.op_type
        if op == "Pad":
            if len(node.input) > 3 and node.input[3]:
                _refuse(node, "it pads selected axes")
        elif op == "Resize":
            a = _attrs(node)
            if a.get("antialias", 0) or a.get("axes") or \
                    a.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
                _refuse(node, "it uses antialias / axes / keep_aspect_ratio_policy")
            _drop_attrs(node, {"antialias", "axes", "keep_aspect_ratio_policy"})
        elif op == "Split":
            a = _attrs(node)
            if "num_outputs" in a:
                if len(node.input) < 2 or not node.input[1]:
                    size = _static_dim(node.input[0], a.get("axis", 0), consts, shapes)
                    if size is None:
                        _refuse(node, "it splits a dynamic dimension by num_outputs")
                    n = int(a["num_outputs"])
                    chunk = -(-size // n)  # opset 18: equal chunks of ceil(size / n)
                    sizes = [chunk] * (n - 1) + [size - chunk * (n - 1)]
                    name = (node.name or node.output[0]) + "/split_sizes"
                    nodes.append(helper.make_node(
                        "Constant", [], [name],
                        value=helper.make_tensor(name, onnx.TensorProto.INT64, [n], sizes)))
                    del node.input[1:]
                    node.input.append(name)
                _drop_attrs(node, {"num_outputs"})
        elif op in _REDUCE_18:
            a = _attrs(node)
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in consts:
                    _refuse(node, "its axes are not a constant")
                axes = [int(v) for v in list(consts[node.input[1]])]
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", axes))
            elif a.get("noop_with_empty_axes", 0):
                _refuse(node, "noop_with_empty_axes")
            _drop_attrs(node, {"noop_with_empty_axes"})
        elif op == "LayerNormalization" and target < 17:
            nodes.extend(_layer_norm_nodes(node, target))
            continue
        nodes.append(node)
    for node in nodes:
        try:
            defs.get_schema(node.op_type, target, node.domain or "")
        except Exception:  # noqa: BLE001  (onnx raises SchemaError)
            _refuse(node, f"no {node.op_type} operator at opset {target}")
        del node.metadata_props[:]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        del value.metadata_props[:]
    for tensor in graph.initializer:
        del tensor.metadata_props[:]
    del graph.metadata_props[:]
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = target
    model.ir_version = IR_VERSION[target]
    onnx.checker.check_model(model)
    return model
