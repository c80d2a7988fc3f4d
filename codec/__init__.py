"""The .vqz codec: its file format and entropy coders, the classical codecs, the rate ladder and the rate-distortion study."""
