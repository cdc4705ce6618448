"""Trainable adapters, one per training algorithm; each lives with its kind in ``blora.kinds``."""
from .kinds.lora import DORA_EPS, TrainableLoRA, column_norm

__all__ = ["DORA_EPS", "TrainableLoRA", "column_norm"]
