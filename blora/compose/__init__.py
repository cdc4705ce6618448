"""Composing adapters onto a model: block weights, strength schedules, K-LoRA and the patch plan."""
