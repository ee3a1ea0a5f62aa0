"""DeepFusion's wire protocol and the plumbing both sides share.

Modules: `topics` (MQTT topic names), `messages` (control messages), `packets` (knowledge-packet codec),
`store` (object storage), `mqtt` (MQTT client), `config` (typed TOML config), `fingerprint`.
"""

from importlib.metadata import version as _version

__version__ = _version("deepfusion-shared")
