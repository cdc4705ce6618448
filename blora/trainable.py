"""Trainable adapters, one per training algorithm; each lives with its kind in ``blora.kinds``."""
from .kinds.lora import DORA_EPS, INITIALISATIONS, TrainableLoRA, column_norm, initial_down

__all__ = ["DORA_EPS", "INITIALISATIONS", "TrainableLoRA", "column_norm", "initial_down"]
