"""The .vqz codec: its file format and entropy coders (vqz), the classical codecs it is compared with
(classical), the rate ladder (ladder) and the rate-distortion study (study)."""
