"""Trainable adapters, one per training algorithm; each lives with its kind (``blora.kinds``) or its method
(``blora.adalora``). ``blora.algorithms`` says which algorithm uses which."""
from .adalora import TrainableSVD
from .kinds.loha import TrainableLoHa
from .kinds.lokr import TrainableLoKr
from .kinds.lora import INITIALISATIONS, TrainableLoRA, initial_down
from .kinds.trainable import DORA_EPS, Trainable, column_norm

__all__ = ["DORA_EPS", "INITIALISATIONS", "Trainable", "TrainableLoRA", "TrainableLoHa", "TrainableLoKr",
           "TrainableSVD", "column_norm", "initial_down"]
