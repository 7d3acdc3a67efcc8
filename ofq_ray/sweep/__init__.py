"""Ray Tune pieces of a sweep that stand on their own (schedulers)."""
