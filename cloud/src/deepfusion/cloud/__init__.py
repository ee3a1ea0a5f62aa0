"""DeepFusion cloud: ingest knowledge packets, cluster devices, distill and merge them into an MoE."""

from importlib.metadata import version as _version

__version__ = _version("deepfusion-cloud")
