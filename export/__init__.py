"""edgemeta.export: checkpoint → parity-checked ONNX → INT8/FP16 → TensorRT engine → bundle."""
