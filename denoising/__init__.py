"""Noise models and the classical denoisers the learned ones are compared with."""
