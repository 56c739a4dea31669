"""[no torch] Measure a model with onnxruntime: accuracy, latency, memory, gates."""
