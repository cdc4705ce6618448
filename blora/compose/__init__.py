"""Composing adapters: what each feature wants done to the model, as data (``plan``)."""
