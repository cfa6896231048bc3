"""Cache entries that check themselves: label embeddings (clip_text.encode_labels) and image verdicts
(support/image_check.py).

A cache entry is trusted more than anything else a command reads: nobody looks at it, and a wrong one shifts
every result that uses it. So each entry is saved with a sha256 of what it was computed from (its key: the CLIP
file's sha256, the label names and templates; the image paths and their file stats) and of what it holds (every
array's dtype, shape and bytes). An entry whose checksum does not match (a flipped byte, a file cut short by a
crash or a full disk, an entry of another version or written by hand) is recomputed after one warning line.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch


def cache_dir():
    """Where sigrl caches what it can recompute (label embeddings, image verdicts): $SIGRL_CACHE or ~/.cache/sigrl."""
    return os.environ.get("SIGRL_CACHE") or os.path.expanduser("~/.cache/sigrl")


def checksum(key, arrays):
    """sha256 of a JSON-able key and a list of arrays or tensors (dtype, shape and bytes of each)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8", "surrogateescape"))
    for a in arrays:
        a = a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
        digest.update(f"|{a.dtype}{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def distrusted(path, why):
    """Say once that a cache entry is not used, and why; the caller computes it again."""
    print(f"warning: {path}: {why}; computing it again", file=sys.stderr)
