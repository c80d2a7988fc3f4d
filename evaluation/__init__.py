"""Scores of reconstructions (metrics.py) and of a prior and its samples (generation.py)."""
