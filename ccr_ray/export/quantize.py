"""Dynamic int8 quantisation of the text graphs with onnxruntime's own tools (no hand-written quantiser).

`quant_pre_process` first (ONNX shape inference + onnxruntime graph optimisation, which folds the exporter's
weight transposes so MatMul weights become initialisers the quantiser can see); its symbolic shape inference
fails on these graphs, so it is skipped (platform notes). Then `quantize_dynamic`: int8 weights for MatMul
and Gather (so the token tables shrink 4x too), activations quantised per batch at run time. Only text graphs
are quantised: the image tower is a small share of serving cost and more sensitive.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# MatMul: every projection. Gather: token tables (M-BERT's 119,547 x 768 is 367 MB in fp32).
OP_TYPES = ("MatMul", "Gather")


def quantize_text_graph(src: str | os.PathLike, dst: str | os.PathLike, per_channel: bool = False,
                        external_data: bool = False) -> list[str]:
    """Write the int8 graph `dst` (plus `dst.data` with external_data, for graphs near protobuf's 2 GB limit);
    returns the file names written."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="ccr-quant-", dir=dst.parent) as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external_data,
                          all_tensors_to_one_file=True)
        quantize_dynamic(str(pre), str(dst), op_types_to_quantize=list(OP_TYPES), per_channel=per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=external_data)
    return [dst.name] + sorted(p.name for p in dst.parent.glob(dst.name + "*.data"))
