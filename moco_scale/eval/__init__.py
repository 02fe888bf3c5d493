"""Evaluation of a backbone's features: the weighted kNN monitor and the linear probe."""
