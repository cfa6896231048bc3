"""The one rule for output paths, which every command applies before any work: an output never replaces one of
the command's own inputs, never another output of the same command, and is of the kind it must be.

    check_outputs(outputs, inputs)   refuses, in one UsageError line, an output that
        - names an input of the same command (checkpoint, score and label files, images, CLIP file, labels file),
          followed through symbolic and hard links: the same file is the same (device, inode) pair;
        - is the same path as another output (--json out.txt --csv out.txt would keep only the CSV);
        - is a folder where a file is expected, or an existing file where a folder is expected;
        - is a folder output inside a folder of inputs (its files would be read as inputs next time);
        - is a file in a folder that does not exist, or lies in one that cannot be written.
outputs: (flag, path) for a file, (flag, path, FOLDER) for a folder; inputs: (what, path) pairs, a path being a
file or, for commands that walk folders (predict.py), a folder of inputs.
"""
import os

from support.errors import UsageError

FOLDER = "folder"


def _identity(path):
    """(device, inode) of an existing path, following links; None when there is nothing there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _writable_parent(flag, path, folder_output):
    """A file's folder must exist (nothing makes it); a folder output is made, so its nearest existing
    ancestor must be a folder. Either must be writable (an existing folder output: itself)."""
    folder = os.path.abspath(path) if folder_output and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while folder_output and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.exists(folder):
        raise UsageError(f"{flag} {path}: {folder} does not exist (expected the folder the file goes in)")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: {folder} is a file, expected a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {folder} is not a writable folder")


def check_outputs(outputs, inputs=()):
    """Apply the rule above (see the module docstring); returns nothing, raises UsageError."""
    outputs = [(o[0], str(o[1]), len(o) > 2 and o[2] == FOLDER) for o in outputs if o[1]]
    inputs = [(what, str(path)) for what, path in inputs if path]
    files_in = {}
    for what, path in inputs:
        key = _identity(path)
        if key is not None and not os.path.isdir(path):
            files_in.setdefault(key, (what, path))
    folders_in = [(what, path) for what, path in inputs if os.path.isdir(path)]
    seen, made = {}, {os.path.realpath(path) for _, path, folder in outputs if folder}
    for flag, path, folder in outputs:
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{flag} {path}: also given to {seen[real]}; each output needs a file of its own")
        seen[real] = flag
    for flag, path, folder in outputs:
        exists = os.path.exists(path)
        if folder and exists and not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: an existing file; expected a folder (for the files it writes)")
        if not folder and os.path.isdir(path):
            raise UsageError(f"{flag} {path}: a folder; expected a file name")
        if not folder:
            clash = files_in.get(_identity(path)) if exists else None
            if clash is not None:
                raise UsageError(f"{flag} {path}: is {clash[0]} {clash[1]}, an input of this command; writing "
                                 f"there would replace it (choose another file name)")
        else:
            for what, given in folders_in:
                if _inside(path, given):
                    raise UsageError(f"{flag} {path}: inside {given}, the folder of {what} this command reads; "
                                     f"its files would be read as inputs next time (choose another folder)")
        # a file in a folder output (--explain's PNGs) has its folder made with it
        _writable_parent(flag, path, folder or os.path.dirname(os.path.realpath(path)) in made)
