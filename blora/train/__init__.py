"""Training: the recipe, its data and what a run shows while it trains."""
