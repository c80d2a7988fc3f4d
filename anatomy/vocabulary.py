"""The tissue vocabulary every module shares: a tissue mask holds class 0 (background) or one of TISSUE_CLASSES per
pixel; their short names (TISSUES, the order of every per-tissue column and table), the colours they are drawn in,
the Dice columns of a per-slice table, and the datasets that come with masks. Nothing of this project is imported
here, so any module (dataset.py and utils.py included) can import it."""

TISSUES = ("CSF", "GM", "WM")  # cerebrospinal fluid, grey matter, white matter: classes 1..3 of a mask
TISSUE_CLASSES = (1, 2, 3)  # the mask value of each of TISSUES; 0 is background
TISSUE_COLOURS = ("black", "tab:blue", "tab:orange", "white")  # classes 0..3: background, CSF, grey and white matter
DICE_COLUMNS = tuple(f"dice_{t.lower()}" for t in TISSUES) + ("dice_mean",)  # a dice_table's columns
MASKED_DATASETS = ("OASIS", "demo")  # the datasets that come with tissue masks
