"""Neutral file plumbing every layer may use: crash-safe writes (atomic) and the names of a run
directory's files (run_dir). Imports nothing from the rest of megacpm."""
