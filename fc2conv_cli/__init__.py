"""fc2conv: turn the fully-connected head of a CNN checkpoint into convolution weights."""

__version__ = "0.2.0"
