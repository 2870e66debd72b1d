"""The start-up cache: the model traced or compiled once, loaded by later runs."""
