"""Runs to look at: the list of runs (`ftune runs`), each run's plots and report page, and comparisons."""
