"""Damage a saved checkpoint on disk the way a checksum must catch: valid files, other bytes."""
from pathlib import Path

import numpy as np
import tensorstore as ts


def rewrite_on_disk(step_dir: Path, array: str) -> None:
    """Add 1 to the first value of `array` ("params/w") in a saved step's files, through TensorStore: valid files
    that Orbax reads without complaint, holding other bytes than were saved (what a bad copy or bit rot that got past
    the filesystem leaves; a byte flipped in the files' compressed index is an unreadable array instead)."""
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{Path(step_dir) / 'state'}/"},
            "path": f"{array.replace('/', '.')}/"}
    stored = ts.open(spec).result()
    values = np.array(stored.read().result())
    values.reshape(-1)[0] += 1
    stored.write(values).result()
