"""Adapters in memory: the adapter kinds (one module each, one registry), the per-module adapter, DoRA, and their trainable forms."""
