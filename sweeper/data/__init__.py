"""Corpora for the proxy models: the embedded stdlib corpus, a text file, or token shards.

    data = load_data(DataConfig(corpus="stdlib"))
    for x, y in train_batches(data, batch_size=16, seq_len=128, seed=0): ...
    val = val_batches(data, batch_size=32, seq_len=128, n=4)

No network, ever. See sources.py (loading, fingerprints), stdlib.py (the embedded corpus),
shards.py (nanoGPT / modded-nanogpt formats) and batches.py (sampling).
"""

from sweeper.data.batches import Batch, check_length, train_batches, val_batches
from sweeper.data.sources import Data, fingerprint, load_data
from sweeper.data.tokens import ConcatTokens, DataError

__all__ = [
    "Batch",
    "ConcatTokens",
    "Data",
    "DataError",
    "check_length",
    "fingerprint",
    "load_data",
    "train_batches",
    "val_batches",
]
