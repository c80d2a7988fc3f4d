"""NIfTI volumes: reading, slicing, placing slices on a canvas, and reconstructing and writing them back."""
