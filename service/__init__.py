"""Foal-Net serving side: torch-free, ONNX Runtime behind FastAPI."""
