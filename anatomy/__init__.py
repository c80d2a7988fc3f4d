"""The anatomy judge: the tissue vocabulary and the segmenter scores (Dice, tissue shares, features)."""
