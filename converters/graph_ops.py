"""ai.edgeact ops the model families need, each with an ONNX function body so onnxruntime runs the file.

HeadRMSNorm(x, w) epsilon -> y: RMSNormalization of each head of x [B, S, heads*D] over its D entries,
scaled by w [D] (Gemma 3's and Qwen3's q/k norm, before rotary). onnxruntime's CPU GroupQueryAttention
does not take q/k norm weights, so the norm is a node of its own.
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "ai.edgeact"


def head_rms_norm_function() -> onnx.FunctionProto:
    eps = helper.make_attribute_ref("epsilon", AttributeProto.FLOAT)
    rms = helper.make_node("RMSNormalization", ["heads", "w"], ["normed"], axis=-1)
    rms.attribute.append(eps)
    nodes = [
        helper.make_node("Constant", [], ["lead"], value=helper.make_tensor("lead", TensorProto.INT64, [3], [0, 0, -1])),
        helper.make_node("Shape", ["w"], ["d"]),
        helper.make_node("Concat", ["lead", "d"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["x", "split_shape"], ["heads"]),
        rms,
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Reshape", ["normed", "x_shape"], ["y"]),
    ]
    return helper.make_function(DOMAIN, "HeadRMSNorm", ["x", "w"], ["y"], nodes,
                                [helper.make_opsetid("", 23)], attributes=["epsilon"])
