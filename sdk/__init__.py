"""edgeact: convert small language models to 4-bit, activation-sparse ONNX folders and run them on the edge."""
__version__ = "0.1.0"
