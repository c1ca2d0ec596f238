"""Benchmarks: commands that print figures (MIL accuracy on classic data sets, training speed)."""
