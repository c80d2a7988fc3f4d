"""Noise models, the classical denoisers, and the benchmark of a denoising VQ-VAE against them (predict.py --noise)."""
