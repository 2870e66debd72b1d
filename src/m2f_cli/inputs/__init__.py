"""Stages 1-3: walk the inputs, decode them, batch them (the DataLoader) and preprocess."""
