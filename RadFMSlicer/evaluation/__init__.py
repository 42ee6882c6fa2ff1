"""Evaluate RadFM against references: manifests, scores from maintained libraries, runs, comparisons."""
