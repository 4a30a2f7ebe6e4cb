"""Component specs, ONNX export and clean-up, artifact/manifest I/O, engine building."""
