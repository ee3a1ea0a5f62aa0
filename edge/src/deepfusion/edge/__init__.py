"""DeepFusion edge device: adapt, shrink and run a local LLM, and publish what it knows."""

from importlib.metadata import version as _version

__version__ = _version("deepfusion-edge")
