"""The token store: image tokens encoded once, kept on disk, read back by id.

- `edje.store.format`: the files (safetensors shards and a JSON manifest);
- `edje.store.writer`: `TokenStoreWriter`, whole shards written atomically, resumable;
- `edje.store.lock`: `store_lock`, one writer of a store at a time (`StoreBusyError`);
- `edje.store.reader`: `TokenStore`, memory-mapped reads by id;
- `edje.store.fingerprint`: what made a store (vision encoder, preprocessing, adapter);
- `edje.store.encode`: `encode_store`, images -> store through Lightning (many devices).
"""

from edje.store.format import StoreCorruptError
from edje.store.lock import StoreBusyError, store_lock
from edje.store.reader import TokenStore
from edje.store.writer import TokenStoreWriter

__all__ = ["StoreBusyError", "StoreCorruptError", "TokenStore", "TokenStoreWriter", "store_lock"]
