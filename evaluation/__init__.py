"""Scores of reconstructions and samples: per-split quality, prior bits, feature distances."""
