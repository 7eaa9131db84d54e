"""phicapd: an image-captioning daemon around Phi-3.5-vision."""

__version__ = "0.1.0"
