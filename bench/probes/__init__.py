"""Probes: scripts that reproduce a field finding and print its figures (not tests)."""
