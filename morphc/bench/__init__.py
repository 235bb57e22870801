"""``morphc bench``: reproducible evidence, side by side with the usual remedies."""
