"""What a set of cells is: the manifest, safe image decoding, and the synthetic cohort."""
