"""Serving a trained model: ONNX export with parity checks (`onnx_export`), int8 text graphs (`quantize`),
batch embeddings on Ray Data (`embeddings`, the only Ray code here), evaluation and search from embeddings
(`evaluate`, `search`). The torch-free runtime that reads an export folder is `ccr_ray.runtime`.
"""
