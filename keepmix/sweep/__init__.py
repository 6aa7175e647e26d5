"""Sweeps: arms as ordinary run directories, one baseline, the Pareto front, a fitted mixture, merges."""
