"""Consuming an exported model (the folder `export/to_onnx.py` writes), through the torch-free runtime
(`ccr_ray.runtime`) only: batch embeddings of a dataset on Ray Data (`embeddings`), search over them (`search`),
and their retrieval metrics (`evaluate`, the one module here that computes with the PyTorch metric code).
Writing ONNX lives in `ccr_ray.export`."""
