"""PyTorch side: base-model loading, checkpoint formats, LoRA maths, reference pipelines."""
