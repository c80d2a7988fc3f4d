"""NIfTI volumes: reading, slicing, placing slices on a canvas and writing reconstructions back."""
