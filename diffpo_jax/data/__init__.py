"""Trajectory data: building the array_record dataset (trajectories.py) and loading batches (loader.py)."""
