"""The whitening SVD engine: layer-by-layer calibration, whitening, grouped SVD, ranks, low-rank modules."""
