"""Writing an exported model: ONNX graphs with their parity check (`onnx_export`, `probes`) and int8 graphs
(`quantize`). Reading it back is `ccr_ray.runtime` and `ccr_ray.inference`."""
