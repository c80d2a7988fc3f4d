"""The training kit: checkpoints and their schema, run folders, the epoch protocol every trainer runs."""
