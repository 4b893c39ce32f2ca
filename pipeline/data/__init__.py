"""Datasets: the synthetic ChestX-ray14 generator and the loaders built on the NIH layout."""
