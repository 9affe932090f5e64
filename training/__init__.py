"""EfficientVLM training layer."""
