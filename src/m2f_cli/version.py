"""The version, in a module of its own: every module can import it without importing the package
root (whose lazy attributes reach the whole library)."""

__version__ = "0.1.0"
