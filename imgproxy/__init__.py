"""imgproxy: a distributed image cache proxy on Twisted."""

__version__ = "0.1.0"
