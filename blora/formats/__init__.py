"""Adapter files: key dialects, canonical keys, reading and writing safetensors, metadata, the report."""
