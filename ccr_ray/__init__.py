"""ccr-ray: teach an English CLIP new languages (MLA, DASD) with Ray, and serve it with ONNX.

Importing the package is cheap and torch-free (the ONNX runtime, `ccr_ray.runtime`, must import without torch);
import submodules for the real work.
"""

__version__ = "0.1.0"
