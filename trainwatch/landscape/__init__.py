"""Loss landscapes after training: filter-normalised directions (Li et al., NeurIPS 2018), a fast grid
evaluator, plots, and the job that reads a run's checkpoint and evaluation data and logs the result to it."""
