"""The soft-label store: the contract between precompute (stage one) and distill (stage two).

See FORMAT.md beside this file. No torch import anywhere in this package.
"""

from smoothkd.storage_schemas.reader import SoftLabelStore
from smoothkd.storage_schemas.spec import SCHEMA_VERSION, Manifest, SequenceLabels, TopKLabels
from smoothkd.storage_schemas.verify import verify_store
from smoothkd.storage_schemas.writer import PartBuilder, StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "Manifest",
    "PartBuilder",
    "SequenceLabels",
    "SoftLabelStore",
    "StoreWriter",
    "TopKLabels",
    "verify_store",
]
