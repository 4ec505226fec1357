"""Command-line tools around training: reference-loss precompute, inspection, the demo and
the ablation."""
