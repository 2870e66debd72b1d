"""What reads a run's outputs: report, eval, merge, and the dry run."""
