"""Evaluation metrics and statistics (paired comparisons of methods on the same slides)."""
