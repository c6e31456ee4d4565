"""Standard exports: a run's backbone as a timm folder, a store as AnnData, an index's neighbours as CSV.

One module per export; the CLI (``marrowlens export ...``) only parses arguments and prints.
"""
