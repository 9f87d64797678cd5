"""Deterministic builders for small, realistic ONNX test models.

Every model function is pure: given the same arguments (including ``seed``) it
returns a byte-identical ``onnx.ModelProto`` (opset 17, ir_version 8, static
float32 shapes) that passes ``onnx.checker.check_model(m, full_check=True)`` and
runs in onnxruntime in milliseconds.  Weights use He-style scales and every
BatchNormalization has non-trivial gamma/beta/mean/var, so folding or pruning
bugs show up numerically rather than hiding behind identity parameters.

``GraphBuilder`` is the small helper the model functions are written with; it
is exported so tests can assemble ad-hoc graphs::

    b = GraphBuilder(seed=0)
    x = b.input("input", [1, 3, 16, 16])
    y = b.relu(b.bn(b.conv(x, 8, 3, bias=False)))
    b.output(b.gemm(b.flatten(b.gap(y)), 10))
    model = b.build()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "IR_VERSION",
    "GraphBuilder",
    "resnet_basic",
    "resnet_bottleneck",
    "mobilenet_v2",
    "inception",
    "densenet",
    "shufflenet_v2",
    "se_block",
    "flatten_gemm_head",
    "transformer_encoder",
    "plain_cnn",
    "conv_attention",
    "ALL_MODELS",
    "NPU_MODELS",
    "efficientnet",
    "mobilenet_v3",
    "convnext",
]

OPSET = 17
IR_VERSION = 8

Shape = list[int]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


class GraphBuilder:
    """Append-only ONNX graph builder that tracks static shapes and unique names.

    Every op method takes tensor names and returns the output tensor name(s);
    ``shape(name)`` / ``channels(name)`` give the tracked static shape.  Weights
    are drawn from ``np.random.default_rng(seed)`` in call order, so building
    the same sequence of calls with the same seed is fully deterministic.
    """

    def __init__(self, name: str = "edgec_test", seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, Shape] = {}
        self._used: set[str] = set()
        self._counters: dict[str, int] = {}

    # ------------------------------------------------------------------ naming
    def _uname(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0)
        while True:
            cand = f"{prefix}_{n}"
            n += 1
            if cand not in self._used:
                break
        self._counters[prefix] = n
        self._used.add(cand)
        return cand

    def _out_name(self, node: str) -> str:
        name = f"{node}_out"
        return self._reserve(name) if name not in self._used else self._uname(name)

    def _rename(self, old: str, new: str) -> None:
        self._reserve(new)
        for node in self.nodes:
            for seq in (node.input, node.output):
                for i, v in enumerate(seq):
                    if v == old:
                        seq[i] = new
        self.shapes[new] = self.shapes.pop(old)

    def _reserve(self, name: str) -> str:
        if name in self._used:
            raise ValueError(f"name {name!r} already used")
        self._used.add(name)
        return name

    # ----------------------------------------------------------------- shapes
    def shape(self, x: str) -> Shape:
        """Tracked static shape of tensor ``x``."""
        return list(self.shapes[x])

    def channels(self, x: str) -> int:
        """Size of axis 1 (the channel axis for NCHW / [N, C] tensors)."""
        return self.shapes[x][1]

    # ------------------------------------------------------------ primitives
    def input(self, name: str = "input", shape: Sequence[int] = (1, 3, 16, 16)) -> str:
        """Declare a float32 graph input with a static shape."""
        self._reserve(name)
        shape = [int(d) for d in shape]
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        self.shapes[name] = shape
        return name

    def output(self, x: str, name: str | None = None) -> str:
        """Mark ``x`` as a graph output, renaming the tensor in place to ``name`` if given.

        Graph inputs and initializers cannot be renamed, so those get an Identity.
        """
        if name is not None and name != x:
            produced = any(x in n.output for n in self.nodes)
            if not produced or any(o.name == x for o in self.outputs):
                x = self.op("Identity", [x], self.shape(x), out_name=name)
            else:
                self._rename(x, name)
                x = name
        self.outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, self.shape(x)))
        return x

    def const(self, value, hint: str = "const", dtype=np.float32) -> str:
        """Add an initializer (any array-like) and return its name."""
        arr = np.asarray(value, dtype=dtype)
        name = self._uname(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.shapes[name] = list(arr.shape)
        return name

    def _param(self, owner: str, suffix: str, arr: np.ndarray, dtype=np.float32) -> str:
        arr = np.asarray(arr, dtype=dtype)
        name = self._reserve(f"{owner}.{suffix}")
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.shapes[name] = list(arr.shape)
        return name

    def _operand(self, v, hint: str) -> str:
        if isinstance(v, str):
            return v
        return self.const(v, hint)

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        out_shape: Shape | Sequence[Shape],
        *,
        n_out: int = 1,
        out_name: str | None = None,
        node_name: str | None = None,
        **attrs,
    ):
        """Generic node; ``out_shape`` is one shape, or a list of shapes if ``n_out > 1``."""
        if node_name is None:
            node = self._uname(op_type.lower())
        else:  # names from _uname are already reserved
            node = node_name
            self._used.add(node)
        if n_out == 1:
            outs = [self._reserve(out_name) if out_name else self._out_name(node)]
            shapes = [list(out_shape)]
        else:
            outs = [self._uname(f"{node}_out{i}") for i in range(n_out)]
            shapes = [list(s) for s in out_shape]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node, **attrs))
        for o, s in zip(outs, shapes):
            self.shapes[o] = [int(d) for d in s]
        return outs[0] if n_out == 1 else outs

    def take(self, t: str, index: int, out_shape: Shape, axis: int = 0) -> str:
        """Gather of one scalar index along ``axis``: that axis goes (how exporters take a fused
        QKV projection apart)."""
        return self.op("Gather", [t, self.const(np.asarray(index, dtype=np.int64), "index", dtype=np.int64)],
                       out_shape, axis=axis)

    # ----------------------------------------------------------- init helpers
    def _he(self, shape: Sequence[int], fan_in: int, gain: float = 2.0) -> np.ndarray:
        return self.rng.normal(0.0, math.sqrt(gain / max(fan_in, 1)), size=tuple(shape))

    # ------------------------------------------------------------ conv / norm
    def conv(
        self,
        x: str,
        cout: int,
        k: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        pad: int | Sequence[int] | None = None,
        group: int = 1,
        bias: bool = True,
        dilation: int | Sequence[int] = 1,
    ) -> str:
        """Conv2d (NCHW) with He-initialised weight; ``pad=None`` means 'same' for odd k."""
        n, cin, h, w = self.shape(x)
        kh, kw = _pair(k)
        sh, sw = _pair(stride)
        dh, dw = _pair(dilation)
        ph, pw = _pair(pad) if pad is not None else (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        if cin % group or cout % group:
            raise ValueError(f"group={group} must divide cin={cin} and cout={cout}")
        node = self._uname("conv")
        wname = self._param(node, "weight", self._he([cout, cin // group, kh, kw], cin // group * kh * kw))
        ins = [x, wname]
        if bias:
            ins.append(self._param(node, "bias", self.rng.normal(0.0, 0.1, size=cout)))
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = self._out_name(node)
        self.nodes.append(
            helper.make_node(
                "Conv", ins, [out], name=node,
                kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                dilations=[dh, dw], group=group,
            )
        )
        self.shapes[out] = [n, cout, ho, wo]
        return out

    def dwconv(self, x: str, k: int = 3, stride: int = 1, bias: bool = False) -> str:
        """Depthwise conv: group == channels == cout."""
        c = self.channels(x)
        return self.conv(x, c, k, stride, group=c, bias=bias)

    def bn(self, x: str, eps: float = 1e-5) -> str:
        """BatchNormalization (inference) with non-trivial random gamma/beta/mean/var."""
        c = self.channels(x)
        node = self._uname("bn")
        g = self._param(node, "scale", self.rng.uniform(0.5, 1.5, c))
        b = self._param(node, "bias", self.rng.normal(0.0, 0.2, c))
        m = self._param(node, "mean", self.rng.normal(0.0, 0.2, c))
        v = self._param(node, "var", self.rng.uniform(0.5, 1.5, c))
        return self.op("BatchNormalization", [x, g, b, m, v], self.shape(x), node_name=node, epsilon=eps)

    def layernorm(self, x: str, axis: int = -1, eps: float = 1e-5) -> str:
        """LayerNormalization (opset 17) with random scale ~1 and bias ~0."""
        s = self.shape(x)
        norm_shape = s[axis:] if axis != 0 else s
        node = self._uname("layernorm")
        g = self._param(node, "scale", 1.0 + self.rng.normal(0.0, 0.1, norm_shape))
        b = self._param(node, "bias", self.rng.normal(0.0, 0.1, norm_shape))
        return self.op("LayerNormalization", [x, g, b], s, node_name=node, axis=axis, epsilon=eps)

    # ------------------------------------------------------------ activations
    def relu(self, x: str) -> str:
        return self.op("Relu", [x], self.shape(x))

    def sigmoid(self, x: str) -> str:
        return self.op("Sigmoid", [x], self.shape(x))

    def tanh(self, x: str) -> str:
        return self.op("Tanh", [x], self.shape(x))

    def hardswish(self, x: str) -> str:
        return self.op("HardSwish", [x], self.shape(x))

    def erf(self, x: str) -> str:
        return self.op("Erf", [x], self.shape(x))

    def clip(self, x: str, lo: float | None = 0.0, hi: float | None = 6.0) -> str:
        """Clip with scalar min/max initializers (opset 11+ form)."""
        ins = [x, self.const(lo, "clip_min") if lo is not None else ""]
        if hi is not None:
            ins.append(self.const(hi, "clip_max"))
        return self.op("Clip", ins, self.shape(x))

    def relu6(self, x: str) -> str:
        return self.clip(x, 0.0, 6.0)

    def silu(self, x: str) -> str:
        """SiLU / Swish exported as x * Sigmoid(x)."""
        return self.mul(x, self.sigmoid(x))

    def gelu(self, x: str) -> str:
        """Exact GELU in the exporter's Erf form: x * 0.5 * (1 + Erf(x / sqrt(2)))."""
        e = self.erf(self.div(x, np.float32(math.sqrt(2.0))))
        return self.mul(self.mul(x, self.add(e, np.float32(1.0))), np.float32(0.5))

    def softmax(self, x: str, axis: int = -1) -> str:
        return self.op("Softmax", [x], self.shape(x), axis=axis)

    def identity(self, x: str) -> str:
        return self.op("Identity", [x], self.shape(x))

    def dropout(self, x: str) -> str:
        """Inference-mode Dropout (no ratio / training_mode inputs): an identity."""
        return self.op("Dropout", [x], self.shape(x))

    # -------------------------------------------------------------- binary ops
    def _binary(self, op_type: str, a, b) -> str:
        a = self._operand(a, f"{op_type.lower()}_const")
        b = self._operand(b, f"{op_type.lower()}_const")
        out = list(np.broadcast_shapes(tuple(self.shapes[a]), tuple(self.shapes[b])))
        return self.op(op_type, [a, b], out)

    def add(self, a, b) -> str:
        """Add; either side may be a tensor name or a constant (array/scalar)."""
        return self._binary("Add", a, b)

    def sub(self, a, b) -> str:
        return self._binary("Sub", a, b)

    def mul(self, a, b) -> str:
        return self._binary("Mul", a, b)

    def div(self, a, b) -> str:
        return self._binary("Div", a, b)

    def channel_affine(self, x: str, scale: bool = True, shift: bool = True) -> str:
        """Constant per-channel Mul and/or Add with [1, C, 1, 1] constants (foldable into a conv)."""
        c = self.channels(x)
        if scale:
            x = self.mul(x, self.rng.uniform(0.5, 1.5, (1, c, 1, 1)))
        if shift:
            x = self.add(x, self.rng.normal(0.0, 0.2, (1, c, 1, 1)))
        return x

    # -------------------------------------------------------------- dense ops
    def gemm(self, x: str, nout: int, bias: bool = True, trans_b: int = 1, gain: float = 2.0) -> str:
        """Gemm with a constant weight: [N, K] x W^T (transB=1, W is [nout, K]) + bias."""
        n, k = self.shape(x)
        node = self._uname("gemm")
        wshape = [nout, k] if trans_b else [k, nout]
        ins = [x, self._param(node, "weight", self._he(wshape, k, gain))]
        if bias:
            ins.append(self._param(node, "bias", self.rng.normal(0.0, 0.1, nout)))
        return self.op("Gemm", ins, [n, nout], node_name=node, transB=trans_b)

    def matmul(self, a: str, b: "str | int", gain: float = 1.0) -> str:
        """MatMul of two tensors, or (``b`` an int) of ``a`` with a constant [K, b] weight."""
        if isinstance(b, (int, np.integer)):
            k = self.shape(a)[-1]
            node = self._uname("matmul")
            w = self._param(node, "weight", self._he([k, int(b)], k, gain))
            return self.op("MatMul", [a, w], self.shape(a)[:-1] + [int(b)], node_name=node)
        sa, sb = self.shape(a), self.shape(b)
        if sa[-1] != sb[-2]:
            raise ValueError(f"MatMul mismatch {sa} x {sb}")
        batch = list(np.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2])))
        return self.op("MatMul", [a, b], batch + [sa[-2], sb[-1]])

    def linear(self, x: str, nout: int, bias: bool = True, gain: float = 1.0) -> str:
        """Transformer-style projection: MatMul with constant weight, then Add bias."""
        y = self.matmul(x, nout, gain)
        if bias:
            y = self.add(y, self.rng.normal(0.0, 0.05, nout))
        return y

    # ----------------------------------------------------------- shape ops
    def reshape(self, x: str, shape: Sequence[int]) -> str:
        """Reshape with an int64 shape initializer (0 copies, -1 infers; allowzero=0)."""
        src = self.shape(x)
        out = [src[i] if d == 0 else int(d) for i, d in enumerate(shape)]
        if -1 in out:
            known = int(np.prod([d for d in out if d != -1]))
            out[out.index(-1)] = int(np.prod(src)) // known
        if int(np.prod(out)) != int(np.prod(src)):
            raise ValueError(f"cannot reshape {src} to {list(shape)}")
        s = self.const(np.asarray(shape, dtype=np.int64), "shape", dtype=np.int64)
        return self.op("Reshape", [x, s], out)

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        s = self.shape(x)
        return self.op("Transpose", [x], [s[p] for p in perm], perm=list(perm))

    def flatten(self, x: str, axis: int = 1) -> str:
        s = self.shape(x)
        return self.op("Flatten", [x], [int(np.prod(s[:axis])), int(np.prod(s[axis:]))], axis=axis)

    def concat(self, xs: Sequence[str], axis: int = 1) -> str:
        shapes = [self.shape(x) for x in xs]
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        return self.op("Concat", list(xs), out, axis=axis)

    def split(self, x: str, sizes: Sequence[int], axis: int = 1) -> list[str]:
        """Split with the ``split`` sizes as an int64 input (opset 13+ form)."""
        s = self.shape(x)
        if sum(sizes) != s[axis]:
            raise ValueError(f"split sizes {list(sizes)} do not sum to {s[axis]}")
        sz = self.const(np.asarray(sizes, dtype=np.int64), "split", dtype=np.int64)
        shapes = []
        for n in sizes:
            o = list(s)
            o[axis] = int(n)
            shapes.append(o)
        return self.op("Split", [x, sz], shapes, n_out=len(sizes), axis=axis)

    def channel_shuffle(self, x: str, groups: int = 2) -> str:
        """Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] -> Reshape [N, C, H, W]."""
        n, c, h, w = self.shape(x)
        y = self.reshape(x, [n, groups, c // groups, h, w])
        y = self.transpose(y, [0, 2, 1, 3, 4])
        return self.reshape(y, [n, c, h, w])

    # ----------------------------------------------------------------- pools
    def _pool_out(self, x: str, k, stride, pad) -> Shape:
        n, c, h, w = self.shape(x)
        kh, kw = _pair(k)
        sh, sw = _pair(stride)
        ph, pw = _pair(pad)
        return [n, c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1]

    def maxpool(self, x: str, k: int = 2, stride: int | None = None, pad: int = 0) -> str:
        stride = k if stride is None else stride
        kh, kw = _pair(k)
        ph, pw = _pair(pad)
        return self.op(
            "MaxPool", [x], self._pool_out(x, k, stride, pad),
            kernel_shape=[kh, kw], strides=list(_pair(stride)), pads=[ph, pw, ph, pw],
        )

    def avgpool(self, x: str, k: int = 2, stride: int | None = None, pad: int = 0) -> str:
        stride = k if stride is None else stride
        kh, kw = _pair(k)
        ph, pw = _pair(pad)
        return self.op(
            "AveragePool", [x], self._pool_out(x, k, stride, pad),
            kernel_shape=[kh, kw], strides=list(_pair(stride)), pads=[ph, pw, ph, pw],
        )

    def gap(self, x: str) -> str:
        """GlobalAveragePool -> [N, C, 1, 1]."""
        s = self.shape(x)
        return self.op("GlobalAveragePool", [x], s[:2] + [1] * (len(s) - 2))

    # ------------------------------------------------------------ composites
    def conv_bn(self, x: str, cout: int, k: int = 3, stride: int = 1, group: int = 1, act: str | None = "relu") -> str:
        """Conv (no bias) -> BN -> optional activation ('relu', 'relu6', 'hardswish', 'silu')."""
        y = self.bn(self.conv(x, cout, k, stride, group=group, bias=False))
        return self.act(y, act)

    def act(self, x: str, kind: str | None) -> str:
        if kind is None:
            return x
        return {
            "relu": self.relu, "relu6": self.relu6, "hardswish": self.hardswish,
            "silu": self.silu, "sigmoid": self.sigmoid, "gelu": self.gelu,
        }[kind](x)

    def classifier(self, x: str, num_classes: int, reshape: bool = False) -> str:
        """GAP -> Flatten (or Reshape [N, C]) -> Gemm."""
        y = self.gap(x)
        y = self.reshape(y, [self.shape(y)[0], self.channels(y)]) if reshape else self.flatten(y)
        return self.gemm(y, num_classes, gain=1.0)

    # ----------------------------------------------------------------- build
    def build(self, doc: str = "", value_info: bool = False) -> onnx.ModelProto:
        """Assemble the ModelProto (opset 17, ir_version 8).

        With ``value_info=True`` the tracked shape of every intermediate tensor
        is recorded as graph value_info.
        """
        vi = []
        if value_info:
            io = {v.name for v in self.inputs} | {v.name for v in self.outputs}
            inits = {t.name for t in self.initializers}
            for node in self.nodes:
                for o in node.output:
                    if o and o not in io and o not in inits:
                        vi.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, self.shapes[o]))
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs,
            initializer=self.initializers, value_info=vi, doc_string=doc,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgec.builders",
        )
        model.ir_version = IR_VERSION
        return model


# ============================================================== model zoo


def _basic_block(b: GraphBuilder, x: str, cout: int, stride: int) -> str:
    y = b.conv_bn(x, cout, 3, stride)
    y = b.conv_bn(y, cout, 3, 1, act=None)
    skip = x
    if stride != 1 or b.channels(x) != cout:
        skip = b.conv_bn(x, cout, 1, stride, act=None)
    return b.relu(b.add(y, skip))


def resnet_basic(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 8,
                 num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Stem + identity basic block + strided block with 1x1 conv-BN projection, GAP-Flatten-Gemm: residual Add channel coupling."""
    b = GraphBuilder("resnet_basic", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3)
    y = _basic_block(b, y, width, 1)
    y = _basic_block(b, y, 2 * width, 2)
    b.output(b.classifier(y, num_classes), "output")
    return b.build(resnet_basic.__doc__)


def _bottleneck(b: GraphBuilder, x: str, mid: int, cout: int, stride: int) -> str:
    y = b.conv_bn(x, mid, 1)
    y = b.conv_bn(y, mid, 3, stride)
    y = b.conv_bn(y, cout, 1, act=None)
    skip = x
    if stride != 1 or b.channels(x) != cout:
        skip = b.conv_bn(x, cout, 1, stride, act=None)
    return b.relu(b.add(y, skip))


def resnet_bottleneck(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 16, mid: int = 8,
                      num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """1x1-3x3-1x1 bottleneck blocks (projection, identity, strided projection) with residual Adds: internal vs coupled channels."""
    b = GraphBuilder("resnet_bottleneck", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.maxpool(b.conv_bn(x, width, 3), 3, 1, 1)
    y = _bottleneck(b, y, mid, 4 * mid, 1)
    y = _bottleneck(b, y, mid, 4 * mid, 1)
    y = _bottleneck(b, y, 2 * mid, 8 * mid, 2)
    b.output(b.classifier(y, num_classes), "output")
    return b.build(resnet_bottleneck.__doc__)


def _inverted_residual(b: GraphBuilder, x: str, cout: int, stride: int, expand: int) -> str:
    cin = b.channels(x)
    y = x
    if expand != 1:
        y = b.conv_bn(y, cin * expand, 1, act="relu6")
    y = b.conv_bn(y, b.channels(y), 3, stride, group=b.channels(y), act="relu6")
    y = b.conv_bn(y, cout, 1, act=None)
    if stride == 1 and cin == cout:
        y = b.add(x, y)
    return y


def mobilenet_v2(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 16,
                 num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Inverted residuals (1x1 expand-ReLU6, depthwise 3x3, linear 1x1 project, residual Add), Reshape+Gemm head: depthwise group coupling."""
    b = GraphBuilder("mobilenet_v2", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="relu6")
    y = _inverted_residual(b, y, width // 2, 1, 1)      # t=1: no expand conv
    y = _inverted_residual(b, y, width, 1, 4)
    y = _inverted_residual(b, y, width, 1, 4)           # residual
    y = _inverted_residual(b, y, width + width // 2, 2, 4)
    y = _inverted_residual(b, y, width + width // 2, 1, 4)  # residual
    y = b.conv_bn(y, 4 * width, 1, act="relu6")
    b.output(b.classifier(y, num_classes, reshape=True), "output")
    return b.build(mobilenet_v2.__doc__)


def inception(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 16, num_classes: int = 10,
              factorize_5x5: bool = False, seed: int = 0) -> onnx.ModelProto:
    """4-branch inception module (1x1; 1x1-3x3; 1x1-5x5; maxpool-1x1) Concat then a consumer conv: concat channel-offset mapping."""
    b = GraphBuilder("inception", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3)
    b1 = b.conv_bn(y, 8, 1)
    b2 = b.conv_bn(b.conv_bn(y, 8, 1), 12, 3)
    b3 = b.conv_bn(y, 4, 1)
    if factorize_5x5:
        b3 = b.conv_bn(b.conv_bn(b3, 6, 3), 6, 3)
    else:
        b3 = b.conv_bn(b3, 6, 5)
    b4 = b.conv_bn(b.maxpool(y, 3, 1, 1), 6, 1)
    y = b.concat([b1, b2, b3, b4], axis=1)
    y = b.conv_bn(y, width, 1)
    b.output(b.classifier(y, num_classes), "output")
    return b.build(inception.__doc__)


def densenet(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 16, growth: int = 8,
             n_layers: int = 3, num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Dense block (BN-ReLU-conv output concatenated onto its input) + transition BN-ReLU-1x1-AvgPool: BN over concatenated channels."""
    b = GraphBuilder("densenet", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv(x, width, 3, bias=False)
    for _ in range(n_layers):
        new = b.conv(b.relu(b.bn(y)), growth, 3, bias=False)
        y = b.concat([y, new], axis=1)
    y = b.conv(b.relu(b.bn(y)), b.channels(y) // 2, 1, bias=False)
    y = b.avgpool(y, 2)
    y = b.relu(b.bn(y))
    b.output(b.classifier(y, num_classes), "output")
    return b.build(densenet.__doc__)


def _shuffle_unit(b: GraphBuilder, x: str, cout: int, stride: int) -> str:
    if stride == 1:
        c = b.channels(x)
        left, right = b.split(x, [c // 2, c // 2], axis=1)
        half = c // 2
    else:
        half = cout // 2
        left = b.conv_bn(b.conv_bn(x, b.channels(x), 3, stride, group=b.channels(x), act=None), half, 1)
        right = x
    r = b.conv_bn(right, half, 1)
    r = b.conv_bn(r, half, 3, stride, group=half, act=None)
    r = b.conv_bn(r, half, 1)
    return b.channel_shuffle(b.concat([left, r], axis=1), 2)


def shufflenet_v2(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 16,
                  num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """ShuffleNetV2 units: Split halves, 1x1-dw3x3-1x1 branch, Concat, 5-D Reshape-Transpose-Reshape shuffle: channel permutation."""
    b = GraphBuilder("shufflenet_v2", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3)
    y = _shuffle_unit(b, y, width, 1)
    y = _shuffle_unit(b, y, 2 * width, 2)
    y = _shuffle_unit(b, y, 2 * width, 1)
    y = b.conv_bn(y, 4 * width, 1)
    b.output(b.classifier(y, num_classes), "output")
    return b.build(shufflenet_v2.__doc__)


def se_block(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 16, reduction: int = 4,
             num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-HardSwish + squeeze-excitation (GAP-1x1-ReLU-1x1-Sigmoid-Mul) + SiLU: broadcast Mul gating couples channels."""
    b = GraphBuilder("se_block", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, act="relu")
    y = b.conv_bn(y, width, 3, act="hardswish")
    s = b.gap(y)
    s = b.relu(b.conv(s, max(width // reduction, 1), 1, bias=True))
    s = b.sigmoid(b.conv(s, width, 1, bias=True))
    y = b.mul(y, s)
    y = b.conv_bn(y, width, 3, 2, act="silu")
    b.output(b.classifier(y, num_classes), "output")
    return b.build(se_block.__doc__)


def flatten_gemm_head(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 8, hidden: int = 32,
                      num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU [N,C,4,4] -> Flatten -> Gemm-ReLU-Gemm: each conv channel owns H*W Gemm input features."""
    b = GraphBuilder("flatten_gemm_head", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2)
    y = b.conv_bn(y, width, 3, 2)
    y = b.flatten(y, axis=1)
    y = b.relu(b.gemm(y, hidden))
    b.output(b.gemm(y, num_classes, gain=1.0), "output")
    return b.build(flatten_gemm_head.__doc__)


def transformer_encoder(batch: int = 1, seq: int = 8, d_model: int = 32, heads: int = 4, d_ff: int = 64,
                        seed: int = 0, qkv: str = "separate") -> onnx.ModelProto:
    """Post-LN encoder layer: Q/K/V MatMul+bias, head Reshape/Transpose, scaled Softmax attention, LayerNorm, Erf-GELU FFN: head coupling.

    ``qkv``: ``separate`` (three projections, BERT-style); or one fused projection reshaped to
    ``[B, T, 3, heads, dh]``, transposed to ``[3, B, heads, T, dh]`` and taken apart by ``slice``
    (Slice + Squeeze, paddle2onnx's SVTR), ``gather`` (Gather of a scalar index) or ``split``
    (Split + Squeeze, PyTorch's ``unbind``): timm's ViT and PP-OCR's recognisers; ``kv``: Q
    projected alone, K and V by one projection reshaped to ``[B, T, 2, heads, dh]`` (SegFormer's
    attention, PyTorch's cross-attention)."""
    if d_model % heads:
        raise ValueError("d_model must be divisible by heads")
    if qkv not in ("separate", "slice", "gather", "split", "kv"):
        raise ValueError(f"qkv must be separate, slice, gather, split or kv, not {qkv!r}")
    dh = d_model // heads
    b = GraphBuilder("transformer_encoder", seed)
    x = b.input("input", [batch, seq, d_model])

    def heads_view(t: str, perm: list[int]) -> str:
        return b.transpose(b.reshape(t, [batch, seq, heads, dh]), perm)

    if qkv == "kv":
        q = heads_view(b.linear(x, d_model), [0, 2, 1, 3])          # [B, h, T, dh]
        f = b.transpose(b.reshape(b.linear(x, 2 * d_model), [0, seq, 2, heads, dh]), [2, 0, 3, 1, 4])
        k, v = (b.take(f, i, [batch, heads, seq, dh]) for i in range(2))
        k = b.transpose(k, [0, 1, 3, 2])                             # [B, h, dh, T]
    elif qkv == "separate":
        q = heads_view(b.linear(x, d_model), [0, 2, 1, 3])          # [B, h, T, dh]
        k = heads_view(b.linear(x, d_model), [0, 2, 3, 1])          # [B, h, dh, T]
        v = heads_view(b.linear(x, d_model), [0, 2, 1, 3])          # [B, h, T, dh]
    else:
        f = b.transpose(b.reshape(b.linear(x, 3 * d_model), [0, seq, 3, heads, dh]), [2, 0, 3, 1, 4])
        part = [batch, heads, seq, dh]
        if qkv == "slice":
            parts = []
            for i in range(3):
                se = [b.const(np.asarray([v_], dtype=np.int64), "slice", dtype=np.int64) for v_ in (i, i + 1, 0)]
                sl = b.op("Slice", [f, *se], [1, *part])
                parts.append(b.op("Squeeze", [sl, b.const(np.asarray([0], dtype=np.int64), "axes", dtype=np.int64)], part))
        elif qkv == "gather":
            parts = [b.take(f, i, part) for i in range(3)]
        else:
            axes = b.const(np.asarray([0], dtype=np.int64), "axes", dtype=np.int64)
            parts = [b.op("Squeeze", [t, axes], part) for t in b.split(f, [1, 1, 1], axis=0)]
        q, v = parts[0], parts[2]
        k = b.transpose(parts[1], [0, 1, 3, 2])                     # [B, h, dh, T]
    att = b.mul(b.matmul(q, k), np.float32(1.0 / math.sqrt(dh)))
    att = b.softmax(att, axis=-1)
    ctx = b.matmul(att, v)                                       # [B, h, T, dh]
    ctx = b.reshape(b.transpose(ctx, [0, 2, 1, 3]), [batch, seq, d_model])
    y = b.layernorm(b.add(x, b.linear(ctx, d_model)))
    f = b.linear(b.gelu(b.linear(y, d_ff)), d_model)
    y = b.layernorm(b.add(y, f))
    b.output(y, "output")
    return b.build(transformer_encoder.__doc__)


def conv_attention(heads: int = 2, dh: int = 8, hw: int = 4) -> onnx.ModelProto:
    """Attention on an NCHW map with 1x1 convs: one conv makes Q, K and V ([B, 3, heads, dh, HW],
    taken apart by Gather), the heads go back to [B, heads * dh, H, W] for a 1x1 projection."""
    b = GraphBuilder("conv_attention", seed=0)
    c = heads * dh
    x = b.input("input", [1, c, hw, hw])
    f = b.reshape(b.conv(x, 3 * c, 1), [1, 3, heads, dh, hw * hw])
    q, k, v = (b.take(f, i, [1, heads, dh, hw * hw], axis=1) for i in range(3))
    att = b.softmax(b.matmul(b.transpose(q, [0, 1, 3, 2]), k), axis=-1)  # [1, heads, HW, HW]
    y = b.reshape(b.matmul(v, b.transpose(att, [0, 1, 3, 2])), [1, c, hw, hw])
    b.output(b.add(x, b.conv(y, c, 1)), "output")
    return b.build()


def plain_cnn(batch: int = 1, in_ch: int = 3, hw: int = 16, width: int = 8,
              num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """VGG-ish conv-BN-ReLU-MaxPool chain with Identity, Dropout, cancelling Transposes, Reshape chain, Conv+channel Mul/Add: cleanup fodder."""
    b = GraphBuilder("plain_cnn", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.relu(b.bn(b.conv(x, width, 3, bias=True)))            # conv bias + BN
    y = b.maxpool(b.identity(y), 2)
    y = b.conv(y, 2 * width, 3, bias=True)
    y = b.relu(b.channel_affine(y))                               # Conv -> Mul[1,C,1,1] -> Add[1,C,1,1]
    y = b.dropout(y)
    y = b.transpose(b.transpose(y, [0, 2, 3, 1]), [0, 3, 1, 2])   # NCHW -> NHWC -> NCHW
    y = b.conv_bn(y, 2 * width, 3)
    y = b.maxpool(y, 2)
    n, c, h, w = b.shape(y)
    y = b.reshape(b.reshape(y, [n, c, h * w]), [n, c * h * w])   # Reshape chain
    y = b.flatten(b.identity(y), axis=1)                         # Flatten of an already-2-D tensor
    y = b.relu(b.gemm(b.dropout(y), 32))
    b.output(b.gemm(y, num_classes, gain=1.0), "output")
    return b.build(plain_cnn.__doc__)


ALL_MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "inception": inception,
    "densenet": densenet,
    "shufflenet_v2": shufflenet_v2,
    "se_block": se_block,
    "flatten_gemm_head": flatten_gemm_head,
    "transformer_encoder": transformer_encoder,
    "plain_cnn": plain_cnn,
}


# ============================================================== structures that break naive int8
# Models with one structure each that naive per-tensor int8 gets wrong (tests/test_structures.py
# quantizes each for several targets). Kept apart from ALL_MODELS: they are quantization cases,
# not pruning or pass fodder. Weights are seeded and scaled so activations look like a trained
# network's (BatchNorm statistics measured on image-like inputs, peaked DFL bins, a 0.01 class
# prior, ...); the input generators below give inputs with realistic statistics (smooth
# normalised images, embeddings, sensor-like sequences).


def _normalise_bn(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """Set every BatchNormalization's mean and variance to the statistics of its input on ``x``
    (in graph order, each with the ones before it already set), as training would leave them:
    pre-activations come out ~N(beta, gamma^2) instead of drifting with depth. Statistics are
    rounded to float16 precision so the bytes do not depend on the host's last float bits."""
    import onnxruntime as ort

    inits = {t.name: t for t in model.graph.initializer}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.append(helper.make_empty_tensor_value_info(bn.input[0]))
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        bs = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
        t = np.concatenate([sess.run(None, {model.graph.input[0].name: x[i:i + bs]})[0]
                            for i in range(0, len(x) - bs + 1, bs)]).astype(np.float64)
        axes = (0,) + tuple(range(2, t.ndim))
        mean = t.mean(axis=axes).astype(np.float16).astype(np.float32)
        var = np.maximum(t.var(axis=axes), 1e-3).astype(np.float16).astype(np.float32)
        for name, value in ((bn.input[3], mean), (bn.input[4], var)):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model


def _normalised(model: onnx.ModelProto) -> onnx.ModelProto:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return _normalise_bn(model, smooth_images(max(shape[0], 16), shape, seed=12345))


def _dfl_level(b: GraphBuilder, feat: str, reg_max: int, num_classes: int, stride: int,
               hw: int) -> tuple[str, str]:
    """One YOLOv8/PicoDet head level: (boxes [N, 4, A] in pixels, scores [N, C, A] in [0, 1])."""
    n, _, h, w = b.shape(feat)
    a = h * w
    bins = reg_max + 1
    # class branch: sigmoid logits with the usual prior bias (p = 0.01), a few confident cells
    c = b.conv_bn(feat, b.channels(feat), 3, act="silu")
    node = b._uname("cls_pred")
    cw = b._param(node, "weight", b._he([num_classes, b.channels(c), 1, 1], b.channels(c), 2.0) * 1.5)
    cb = b._param(node, "bias", np.full(num_classes, -4.6) + b.rng.normal(0.0, 0.3, num_classes))
    cls = b.op("Conv", [c, cw, cb], [n, num_classes, h, w], node_name=node, kernel_shape=[1, 1])
    scores = b.reshape(b.sigmoid(cls), [n, num_classes, a])
    # box branch: 4 x (reg_max + 1) bin logits, scaled so each side's distribution is peaked
    r = b.conv_bn(feat, b.channels(feat), 3, act="silu")
    node = b._uname("reg_pred")
    rw = b._param(node, "weight", b._he([4 * bins, b.channels(r), 1, 1], b.channels(r), 2.0) * 1.5)
    rb = b._param(node, "bias", np.tile(-0.15 * (np.arange(bins) - reg_max / 3.0) ** 2, 4))
    reg = b.op("Conv", [r, rw, rb], [n, 4 * bins, h, w], node_name=node, kernel_shape=[1, 1])
    # DFL: [N, 4, bins, A] -> [N, bins, 4, A] -> softmax over bins -> 1x1 conv with 0..reg_max
    d = b.transpose(b.reshape(reg, [n, 4, bins, a]), [0, 2, 1, 3])
    d = b.softmax(d, axis=1)
    node = b._uname("dfl")
    proj = b._param(node, "weight", np.arange(bins, dtype=np.float32).reshape(1, bins, 1, 1))
    d = b.op("Conv", [d, proj], [n, 1, 4, a], node_name=node, kernel_shape=[1, 1])
    dist = b.reshape(d, [n, 4, a])  # (left, top, right, bottom) in grid units
    lt, rb_ = b.split(dist, [2, 2], axis=1)
    gy, gx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    anchors = np.stack([gx.ravel(), gy.ravel()])[None].astype(np.float32)  # [1, 2, A]
    x1y1 = b.sub(anchors, lt)
    x2y2 = b.add(b.const(anchors, "anchors"), rb_)
    boxes = b.mul(b.concat([x1y1, x2y2], axis=1), np.float32(stride))
    return boxes, scores


def dfl_head(batch: int = 1, in_ch: int = 3, hw: int = 64, width: int = 16, num_classes: int = 4,
             reg_max: int = 7, seed: int = 0) -> onnx.ModelProto:
    """YOLOv8/PicoDet-style detector: strided backbone, two head levels (strides 8, 16) with a DFL box branch (Softmax over reg_max+1 bins, 1x1 Conv with 0..reg_max), anchor/stride decode, sigmoid scores; output [N, 4 + C, A] with boxes in pixels beside scores in [0, 1]."""
    b = GraphBuilder("dfl_head", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="silu")                 # /2
    y = b.conv_bn(y, width, 3, 2, act="silu")                 # /4
    p3 = b.conv_bn(y, width, 3, 2, act="silu")                # /8
    p4 = b.conv_bn(p3, 2 * width, 3, 2, act="silu")           # /16
    boxes, scores = [], []
    for feat, stride in ((p3, 8), (p4, 16)):
        bx, sc = _dfl_level(b, feat, reg_max, num_classes, stride, hw)
        boxes.append(bx)
        scores.append(sc)
    out = b.concat([b.concat(boxes, axis=2), b.concat(scores, axis=2)], axis=1)
    b.output(out, "output")
    return _normalised(b.build(dfl_head.__doc__))


def yolox_head(batch: int = 1, in_ch: int = 3, hw: int = 64, width: int = 16, num_classes: int = 4,
               seed: int = 0, obj_beside_reg: bool = False) -> onnx.ModelProto:
    """YOLOX-style decode at stride 8: xy = (pred + grid) * stride, wh = Exp(pred) * stride, scores = Sigmoid(obj) * Sigmoid(cls); output [N, A, 4 + C] (channels last) with pixel boxes beside [0, 1] scores."""
    # obj_beside_reg: YOLOX's own layout (ddddocr's detector): the objectness conv reads the box
    # branch's feature beside the box conv, and the raw maps are the output, decoded outside the
    # graph: Concat(box, Sigmoid(obj), Sigmoid(cls)) -> [N, A, 5 + C]
    if obj_beside_reg:
        return _yolox_raw(batch, in_ch, hw, width, num_classes, seed)
    b = GraphBuilder("yolox_head", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="silu")
    y = b.conv_bn(y, width, 3, 2, act="silu")
    feat = b.conv_bn(y, 2 * width, 3, 2, act="silu")          # stride 8
    n, c, h, w = b.shape(feat)
    a, stride = h * w, 8
    r = b.conv_bn(feat, c, 3, act="silu")
    node = b._uname("reg_pred")
    rw = b._param(node, "weight", b._he([4, c, 1, 1], c, 2.0) * 0.4)
    rb = b._param(node, "bias", np.array([0.5, 0.5, 0.7, 0.7]))
    reg = b.reshape(b.op("Conv", [r, rw, rb], [n, 4, h, w], node_name=node, kernel_shape=[1, 1]), [n, 4, a])
    k = b.conv_bn(feat, c, 3, act="silu")
    node = b._uname("obj_cls_pred")
    kw = b._param(node, "weight", b._he([1 + num_classes, c, 1, 1], c, 2.0) * 1.5)
    kb = b._param(node, "bias", np.concatenate([[-4.6], b.rng.normal(0.0, 0.5, num_classes)]))
    oc = b.reshape(b.op("Conv", [k, kw, kb], [n, 1 + num_classes, h, w], node_name=node, kernel_shape=[1, 1]),
                   [n, 1 + num_classes, a])
    obj, cls = b.split(b.sigmoid(oc), [1, num_classes], axis=1)
    scores = b.mul(obj, cls)
    xy, wh = b.split(reg, [2, 2], axis=1)
    gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([gx.ravel(), gy.ravel()])[None].astype(np.float32)
    xy = b.mul(b.add(xy, grid), np.float32(stride))
    wh = b.mul(b.op("Exp", [wh], b.shape(wh)), np.float32(stride))
    out = b.transpose(b.concat([xy, wh, scores], axis=1), [0, 2, 1])
    b.output(out, "output")
    return _normalised(b.build(yolox_head.__doc__))


def _yolox_raw(batch: int, in_ch: int, hw: int, width: int, num_classes: int, seed: int) -> onnx.ModelProto:
    b = GraphBuilder("yolox_head", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="silu")
    y = b.conv_bn(y, width, 3, 2, act="silu")
    feat = b.conv_bn(y, 2 * width, 3, 2, act="silu")
    n, c, h, w = b.shape(feat)
    r = b.conv_bn(feat, c, 3, act="silu")
    k = b.conv_bn(feat, c, 3, act="silu")

    def pred(x: str, name: str, nout: int, gain: float, bias) -> str:
        node = b._uname(name)
        wt = b._param(node, "weight", b._he([nout, c, 1, 1], c, 2.0) * gain)
        return b.op("Conv", [x, wt, b._param(node, "bias", np.asarray(bias))], [n, nout, h, w], node_name=node,
                    kernel_shape=[1, 1])

    box = pred(r, "reg_pred", 4, 0.4, [0.5, 0.5, 0.7, 0.7])
    obj = b.sigmoid(pred(r, "obj_pred", 1, 1.5, [-4.6]))
    cls = b.sigmoid(pred(k, "cls_pred", num_classes, 1.5, b.rng.normal(0.0, 0.5, num_classes)))
    out = b.transpose(b.reshape(b.concat([box, obj, cls], axis=1), [n, 5 + num_classes, h * w]), [0, 2, 1])
    b.output(out, "output")
    return _normalised(b.build("YOLOX-style raw head: box and objectness convs reading one feature, classes another; "
                               "Concat(box, Sigmoid(obj), Sigmoid(cls)), decoded outside the graph."))


def wide_range_head(batch: int = 1, in_ch: int = 3, hw: int = 32, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Dense regression head whose 7 output channels span 1e-3..1e3 (say a confidence, offsets, a depth in mm), written channels last (Transpose to NHWC): one per-tensor scale for it would zero the small channels."""
    b = GraphBuilder("wide_range_head", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2)
    y = b.conv_bn(y, width, 3, 1)
    y = b.conv_bn(y, width, 3, 1)
    n, c, h, w = b.shape(y)
    node = b._uname("head")
    mags = np.logspace(-3, 3, 7)
    hwt = b._he([7, c, 1, 1], c, 1.0) * mags.reshape(7, 1, 1, 1)
    hb = b.rng.normal(0.0, 0.5, 7) * mags
    head = b.op("Conv", [y, b._param(node, "weight", hwt), b._param(node, "bias", hb)], [n, 7, h, w],
                node_name=node, kernel_shape=[1, 1])
    b.output(b.transpose(head, [0, 2, 3, 1]), "output")
    return _normalised(b.build(wide_range_head.__doc__))


def recurrent(kind: str = "LSTM", batch: int = 2, seq: int = 16, features: int = 8, hidden: int = 32,
              num_classes: int = 5, seed: int = 0) -> onnx.ModelProto:
    """Sequence classifier: MatMul feature projection, one ONNX LSTM (or GRU) layer (PyTorch-style uniform(-1/sqrt(H), 1/sqrt(H)) weights), the final hidden state through a Gemm head; outputs the logits and the final state."""
    if kind not in ("LSTM", "GRU"):
        raise ValueError("kind must be LSTM or GRU")
    gates = 4 if kind == "LSTM" else 3
    b = GraphBuilder(kind.lower(), seed)
    x = b.input("input", [batch, seq, features])
    p = b.add(b.matmul(x, 2 * features, gain=1.0), b.rng.normal(0.0, 0.05, 2 * features))
    p = b.transpose(p, [1, 0, 2])                              # [T, N, F]: the ONNX RNN layout
    k = 1.0 / math.sqrt(hidden)
    node = b._uname(kind.lower())
    wi = b._param(node, "W", b.rng.uniform(-k, k, (1, gates * hidden, 2 * features)))
    wr = b._param(node, "R", b.rng.uniform(-k, k, (1, gates * hidden, hidden)))
    bias = b._param(node, "B", b.rng.uniform(-k, k, (1, 2 * gates * hidden)))
    outs = b.op(kind, [p, wi, wr, bias], [[seq, 1, batch, hidden], [1, batch, hidden]]
                + ([[1, batch, hidden]] if kind == "LSTM" else []), n_out=3 if kind == "LSTM" else 2,
                node_name=node, hidden_size=hidden)
    h = b.reshape(outs[1], [batch, hidden])
    b.output(b.gemm(h, num_classes, gain=1.0), "output")
    b.output(h, "state")
    return b.build(recurrent.__doc__)


def lstm_classifier(**kw) -> onnx.ModelProto:
    return recurrent("LSTM", **kw)


def gru_classifier(**kw) -> onnx.ModelProto:
    return recurrent("GRU", **kw)


def _v3_block(b: GraphBuilder, x: str, expand: int, cout: int, k: int, stride: int, se: bool) -> str:
    cin = b.channels(x)
    y = b.conv_bn(x, expand, 1, act="hardswish")
    y = b.conv_bn(y, expand, k, stride, group=expand, act="hardswish")
    if se:
        y = _se(b, y, max(expand // 4, 8), gate="hardsigmoid")
    y = b.conv_bn(y, cout, 1, act=None)
    if stride == 1 and cin == cout:
        y = b.add(x, y)
    return y


def mobilenet_v3(batch: int = 1, in_ch: int = 3, hw: int = 32, width: int = 16, num_classes: int = 10,
                 seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-style: HardSwish stem, inverted residuals with HardSwish and squeeze-excitation gates (GAP-1x1-ReLU-1x1-HardSigmoid-Mul), residual Add, HardSwish 1x1 and a Gemm classifier."""
    b = GraphBuilder("mobilenet_v3", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="hardswish")
    y = _v3_block(b, y, 4 * width, width, 3, 1, se=True)
    y = _v3_block(b, y, 4 * width, 2 * width, 5, 2, se=True)
    y = _v3_block(b, y, 6 * width, 2 * width, 5, 1, se=True)
    y = b.conv_bn(y, 6 * width, 1, act="hardswish")
    b.output(b.classifier(y, num_classes), "output")
    return _normalised(b.build(mobilenet_v3.__doc__))


STRUCTURE_MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "dfl_head": dfl_head,
    "yolox_head": yolox_head,
    "wide_range_head": wide_range_head,
    "transformer_encoder": transformer_encoder,
    "lstm_classifier": lstm_classifier,
    "gru_classifier": gru_classifier,
    "mobilenet_v3": mobilenet_v3,
}


# -------------------------------------------------------------- realistic inputs
def smooth_images(n: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """``n`` image-like inputs [n, C, H, W]: smooth colour gradients, a few soft-edged blobs and
    a little sensor noise in [0, 1], then normalised with ImageNet's mean and std (C == 3)."""
    rng = np.random.default_rng(seed)
    c, h, w = (int(d) for d in shape[-3:])
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        img = rng.uniform(0.2, 0.8, (c, 1, 1)) + rng.uniform(-0.3, 0.3, (c, 1, 1)) * xx \
            + rng.uniform(-0.3, 0.3, (c, 1, 1)) * yy
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            blob = 1.0 / (1.0 + np.exp(-(r - np.hypot(yy - cy, xx - cx)) / 0.02))
            img = img * (1 - blob) + rng.uniform(0, 1, (c, 1, 1)) * blob
        img += rng.normal(0.0, 0.02, img.shape)
        out[i] = np.clip(img, 0.0, 1.0)
    if c == 3:
        mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
        std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
        out = (out - mean) / std
    return out.astype(np.float32)


def token_embeddings(n: int, shape: Sequence[int], seed: int = 0, outliers: int = 2) -> np.ndarray:
    """``n`` transformer inputs [n, T, D]: rows of a fixed N(0, 1) token table (a 64-token
    vocabulary) plus sinusoidal positions, with ``outliers`` embedding dimensions 8x larger
    (the outlier features trained transformers carry in their residual stream)."""
    t, d = (int(s) for s in shape[-2:])
    table = np.random.default_rng(1234).normal(0.0, 1.0, (64, d))
    table[:, :outliers] *= 8.0
    pos = np.arange(t)[:, None] / np.power(10000.0, np.arange(0, d, 2)[None] / d)
    pe = np.zeros((t, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos), np.cos(pos)
    ids = np.random.default_rng(seed).integers(0, 64, (n, t))
    return (table[ids] + pe[None]).astype(np.float32)


def sensor_sequences(n: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """``n`` sequence inputs [n, T, F]: per-feature sinusoids of random frequency, phase and
    amplitude, a slow drift and noise (accelerometer-like signals)."""
    rng = np.random.default_rng(seed)
    t, f = (int(s) for s in shape[-2:])
    time_ = np.arange(t)[None, :, None]
    freq = rng.uniform(0.05, 0.5, (n, 1, f))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, f))
    amp = rng.uniform(0.5, 2.0, (n, 1, f))
    drift = rng.normal(0.0, 0.05, (n, 1, f)) * time_
    return (amp * np.sin(freq * time_ + phase) + drift + rng.normal(0.0, 0.1, (n, t, f))).astype(np.float32)


def structure_inputs(name: str, model: onnx.ModelProto, n: int, seed: int = 0) -> np.ndarray:
    """Realistic inputs for a :data:`STRUCTURE_MODELS` model, in the model's batch."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if name == "transformer_encoder":
        return token_embeddings(n, shape, seed)
    if name in ("lstm_classifier", "gru_classifier"):
        return sensor_sequences(n, shape, seed)
    return smooth_images(n, shape, seed)


# ---------------------------------------------------------------------- NPU-style CNNs
# Modern ImageNet CNN structures (not in ALL_MODELS: the golden and channel-group tests keep
# their ten): what RKNN-Toolkit2 users deploy and where quantizers differ most (hard-swish,
# SE gates, SiLU, depthwise 5x5/7x7, LayerNorm, GELU, layer scale). Random weights, like the rest.

def _se(b: GraphBuilder, x: str, squeeze: int, act: str = "relu", gate: str = "sigmoid") -> str:
    c = b.channels(x)
    s = b.act(b.conv(b.gap(x), squeeze, 1, bias=True), act)
    s = b.conv(s, c, 1, bias=True)
    s = b.sigmoid(s) if gate == "sigmoid" else b.op("HardSigmoid", [s], b.shape(s), alpha=1.0 / 6, beta=0.5)
    return b.mul(x, s)


def _mbconv(b: GraphBuilder, x: str, cout: int, k: int, stride: int, expand: int, act: str, se: bool,
            gate: str = "sigmoid", se_div: int = 4) -> str:
    cin = b.channels(x)
    y = x
    if expand != 1:
        y = b.conv_bn(y, cin * expand, 1, act=act)
    y = b.conv_bn(y, b.channels(y), k, stride, group=b.channels(y), act=act)
    if se:
        y = _se(b, y, max(cin // se_div, 4), act="silu" if act == "silu" else "relu", gate=gate)
    y = b.conv_bn(y, cout, 1, act=None)
    if stride == 1 and cin == cout:
        y = b.add(x, y)
    return y


def efficientnet(batch: int = 1, in_ch: int = 3, hw: int = 64, width: int = 16, num_classes: int = 10,
                 seed: int = 0) -> onnx.ModelProto:
    """EfficientNet-B0-style: SiLU (x*Sigmoid), MBConv with depthwise 3x3/5x5, SE (SiLU squeeze, Sigmoid gate), residual Adds."""
    b = GraphBuilder("efficientnet", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="silu")
    y = _mbconv(b, y, width, 3, 1, 1, "silu", True)
    y = _mbconv(b, y, width + width // 2, 3, 2, 6, "silu", True)
    y = _mbconv(b, y, width + width // 2, 3, 1, 6, "silu", True)
    y = _mbconv(b, y, 2 * width, 5, 2, 6, "silu", True)
    y = _mbconv(b, y, 2 * width, 5, 1, 6, "silu", True)
    y = _mbconv(b, y, 4 * width, 3, 2, 6, "silu", True)
    y = b.conv_bn(y, 8 * width, 1, act="silu")
    b.output(b.classifier(y, num_classes), "output")
    return b.build(efficientnet.__doc__)


def npu_mobilenet_v3(batch: int = 1, in_ch: int = 3, hw: int = 64, width: int = 16, num_classes: int = 10,
                 seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-Small-style: HardSwish, ReLU, depthwise 3x3/5x5, SE with a HardSigmoid gate, hard-swish head with a hidden Gemm."""
    b = GraphBuilder("mobilenet_v3", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = b.conv_bn(x, width, 3, 2, act="hardswish")
    y = _mbconv(b, y, width, 3, 2, 1, "relu", True, gate="hard")
    y = _mbconv(b, y, width + width // 2, 3, 2, 4, "relu", False)
    y = _mbconv(b, y, width + width // 2, 3, 1, 4, "relu", False)
    y = _mbconv(b, y, 2 * width + width // 2, 5, 2, 4, "hardswish", True, gate="hard")
    y = _mbconv(b, y, 2 * width + width // 2, 5, 1, 4, "hardswish", True, gate="hard")
    y = _mbconv(b, y, 3 * width, 5, 1, 3, "hardswish", True, gate="hard")
    y = b.conv_bn(y, 6 * width, 1, act="hardswish")
    y = b.flatten(b.gap(y))
    y = b.hardswish(b.gemm(y, 8 * width))
    b.output(b.gemm(y, num_classes, gain=1.0), "output")
    return b.build(mobilenet_v3.__doc__)


def _ln2d(b: GraphBuilder, x: str) -> str:
    """LayerNorm over channels of an NCHW tensor, as exported: Transpose -> LayerNormalization -> Transpose."""
    return b.transpose(b.layernorm(b.transpose(x, [0, 2, 3, 1])), [0, 3, 1, 2])


def _cnblock(b: GraphBuilder, x: str) -> str:
    c = b.channels(x)
    y = b.transpose(b.dwconv(x, 7, bias=True), [0, 2, 3, 1])
    y = b.linear(b.layernorm(y), 4 * c, gain=2.0)
    y = b.linear(b.gelu(y), c)
    y = b.mul(y, b.rng.uniform(0.2, 0.6, c).astype(np.float32))  # layer scale
    return b.add(x, b.transpose(y, [0, 3, 1, 2]))


def convnext(batch: int = 1, in_ch: int = 3, hw: int = 64, width: int = 16, num_classes: int = 10,
             seed: int = 0) -> onnx.ModelProto:
    """ConvNeXt-T-style: 4x4 patchify stem, blocks of depthwise 7x7 -> LayerNorm (NHWC) -> Linear -> Erf-GELU -> Linear -> layer scale -> residual, LayerNorm + 2x2 downsampling."""
    b = GraphBuilder("convnext", seed)
    x = b.input("input", [batch, in_ch, hw, hw])
    y = _ln2d(b, b.conv(x, width, 4, 4, pad=0, bias=True))
    for stage, depth in enumerate((2, 2, 3)):
        if stage:
            y = b.conv(_ln2d(b, y), 2 * b.channels(y), 2, 2, pad=0, bias=True)
        for _ in range(depth):
            y = _cnblock(b, y)
    y = b.layernorm(b.flatten(b.gap(y)))
    b.output(b.gemm(y, num_classes, gain=1.0), "output")
    return b.build(convnext.__doc__)


NPU_MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "efficientnet": efficientnet,
    "mobilenet_v3": npu_mobilenet_v3,
    "convnext": convnext,
}
