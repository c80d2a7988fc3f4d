"""The yardstick: the first report's VQ-VAE recipe written as a plain first version, independent of this
repository's model and training code, for bench.py to time this code against on the same machine."""
