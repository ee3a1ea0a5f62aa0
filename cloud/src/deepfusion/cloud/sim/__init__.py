"""The simulator: one run of the federation in-process, its results model and its report."""
