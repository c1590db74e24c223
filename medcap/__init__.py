"""medcap: diagnostic captions for medical images with a multi-stage ensemble."""

__version__ = "0.1.0"
