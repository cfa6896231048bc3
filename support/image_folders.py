"""The images a user points predict.py at: files named, and the image files found in the folders named.

    find_images(inputs)   [path, ...] in walk order (folders sorted), each decoded once to be sure it is readable
Only regular files are opened: a named pipe would block the read forever and a device never end, so anything
else is skipped with a line, as are files without an image extension and images that cannot be decoded.
"""
import os
import sys

import numpy as np
from PIL import Image

from support.image_check import check_images
from support.errors import UsageError
from support.paths import printable

IMAGE_EXTENSIONS = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}


def find_images(inputs):
    """Files named and files found in the folders named (walked in sorted order), kept when PIL can read them.
    A path that does not exist is an error; other files and unreadable images are skipped, with a line each.
    Only regular files are opened: a named pipe would block the read forever, a device never end."""
    paths, skipped = [], []
    for item in inputs:
        if os.path.isdir(item):
            for folder, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                    if not os.path.isfile(path):
                        skipped.append((path, "not a regular file (a pipe, socket or device)"))
                    elif not is_image:
                        skipped.append((path, "not an image file (by its extension)"))
                    else:
                        paths.append(path)
        elif os.path.isfile(item):
            paths.append(item)  # named explicitly: tried whatever its extension
        elif os.path.exists(item):
            raise UsageError(f"{item}: not a regular file (a pipe, socket or device); expected images or folders")
        else:
            raise UsageError(f"{item}: no such file or folder (expected images or folders of images)")
    for path, why in skipped:
        print(f"skipped {printable(path)}: {why}", file=sys.stderr)
    good, bad, why = check_images(paths, cache=False, out=sys.stderr) if paths else (np.zeros(0, bool), [], [])
    for path, reason in zip(bad, why):
        print(f"skipped {printable(path)}: cannot be read as an image ({printable(reason)})", file=sys.stderr)
    paths = [p for p, ok in zip(paths, good) if ok]
    if not paths:
        raise UsageError(f"no readable images in {', '.join(inputs)}")
    return paths
