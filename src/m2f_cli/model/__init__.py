"""Stage 4: resolve, load and run the model (and its start-up cache, model.startup)."""
