"""mae: Masked Autoencoders, from pretraining in PyTorch to ONNX Runtime / TensorRT inference.

Importing this package is cheap and never imports torch: `mae.runtime` must run with numpy + Pillow only.
"""

__version__ = "0.1.0"
