"""Comparing training runs: `prefalign compare` (compare.py) reads run directories (runs.py), draws the
plots (plots.py), computes what they show (findings.py, stats.py) and writes markdown/HTML (report.py)."""
