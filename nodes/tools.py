"""Placeholder: filled by the topic owner."""
NODES: list = []
