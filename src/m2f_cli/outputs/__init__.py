"""Stage 6: the output folder (atomic writes, journals, lock, remote folders) and the writers."""
