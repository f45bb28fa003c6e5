"""Stage runners: each takes a frozen config and a run directory and returns the stage summary.

Experiment scripts in ``experiments/`` are thin command-line wrappers around these.
"""
