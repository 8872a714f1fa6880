"""amusd-viz: see asynchronous multi-device speculative decoding (AMUSD) work."""

__version__ = "0.1.0"
