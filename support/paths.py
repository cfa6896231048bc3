"""The one rule for output paths, which every command applies before any work: an output never replaces one of
the command's own inputs, never another output of the same command, and is of the kind it must be.

    check_outputs(outputs, inputs)   refuses, in one UsageError line, an output that
        - names an input of the same command (checkpoint, score and label files, images, CLIP file, labels file),
          followed through symbolic and hard links: the same file is the same (device, inode) pair;
        - is the same path as another output (--json out.txt --csv out.txt would keep only the CSV);
        - is a folder where a file is expected, or an existing file where a folder is expected;
        - is a folder output inside a folder of inputs (its files would be read as inputs next time), or a file
          a folder output writes into a folder of inputs (G/images/0000.png when G/images is read);
        - is a file in a folder that does not exist, or lies in one that cannot be written;
        - is a file named inside a folder output (index.html, images/0000.png) whose folder is a symbolic link
          out of that folder output (the write would land elsewhere);
        - has a name too long for its folder's file system, counting the temporary name safe_io writes first.
    inner_folder(folder, name)   folder/name made for writing, refused when it is (or resolves to) something
        outside `folder`: the check again at the moment of writing, for a link made after check_outputs.
    printable(text)   text with control characters escaped (a newline as \\n, ESC as \\x1b), for printing names;
    line_breaking(text)   the first character of text that would break a one-name-a-line file, or None.
outputs: (flag, path) for a file, (flag, path, FOLDER) for a folder; inputs: (what, path) pairs, a path being a
file or, for commands that walk folders (predict.py), a folder of inputs.
"""
import os
import unicodedata

from support.errors import UsageError

FOLDER = "folder"
TMP_SUFFIX = ".tmp-4194304"  # safe_io writes ".<name>.tmp-<pid>" first; the largest Linux pid has 7 digits


def line_breaking(text):
    """The first character of `text` that starts a new line or drives a terminal (a control character, U+2028,
    U+2029: Python's splitlines breaks at each), or None."""
    return next((c for c in str(text) if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)


def printable(text):
    """`text` with every control and format character escaped: a file name holding a newline, a terminal escape
    sequence or a right-to-left override is printed as one line of the characters it holds, never as a second
    line, a colour change or reversed text."""
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") else c
                   for c in str(text))


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


def _name_fits(flag, path):
    """A name the file system cannot hold would fail at the write, after the work: refuse it now."""
    folder = os.path.dirname(os.path.abspath(path)) or os.sep
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    name = os.path.basename(path)
    if len(os.fsencode("." + name + TMP_SUFFIX)) > limit:
        raise UsageError(f"{flag} {printable(path)}: the file name is {len(os.fsencode(name))} bytes; this file "
                         f"system takes {limit}, less {len(TMP_SUFFIX) + 1} for the temporary name written first "
                         f"(shorten it)")


def _stays_inside(flag, path, folder_outputs):
    """A file named inside a folder output must be written inside it: no folder on the way is a link out."""
    here = os.path.abspath(path)
    for folder in folder_outputs:
        top = os.path.abspath(folder)
        if here.startswith(top.rstrip(os.sep) + os.sep) and not _inside(os.path.dirname(here), top):
            raise UsageError(f"{flag} {printable(path)}: {printable(os.path.dirname(here))} leads out of {folder} "
                             f"(a symbolic link to {printable(os.path.realpath(os.path.dirname(here)))}); remove the "
                             f"link or choose another folder")


def inner_folder(folder, name):
    """folder/name, made if missing, for writing into: refused (UsageError) when it is a symbolic link, or resolves
    outside `folder`, so that no file meant for the output folder is written elsewhere."""
    path = os.path.join(folder, name)
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise UsageError(f"{printable(path)}: a symbolic link or a file, expected a folder of {folder}'s own "
                         f"(remove it, or choose another output folder)")
    os.makedirs(path, exist_ok=True)
    if not _inside(path, folder) or os.path.islink(path):
        raise UsageError(f"{printable(path)}: resolves outside {folder}; remove the link or choose another folder")
    return path


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
    seen = {}
    folder_outputs = [path for _, path, folder in outputs if folder]
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
            _stays_inside(flag, path, folder_outputs)
            owned = any(_inside(os.path.dirname(path), f) for f in folder_outputs)  # a folder output's own file
            for what, given in folders_in if owned else ():
                if _inside(os.path.dirname(path), given):
                    raise UsageError(f"{flag} {printable(path)}: inside {given}, the folder of {what} this command "
                                     f"reads; its files would be read as inputs next time (choose another folder)")
            _name_fits(flag, path)
            clash = files_in.get(_identity(path)) if exists else None
            if clash is not None:
                raise UsageError(f"{flag} {path}: is {clash[0]} {clash[1]}, an input of this command; writing "
                                 f"there would replace it (choose another file name)")
        else:
            for what, given in folders_in:
                if _inside(path, given):
                    raise UsageError(f"{flag} {path}: inside {given}, the folder of {what} this command reads; "
                                     f"its files would be read as inputs next time (choose another folder)")
        # a file in a folder output (--explain's PNGs, a gallery's images/) has its folders made with it
        _writable_parent(flag, path, folder or any(_inside(os.path.dirname(path), f) for f in folder_outputs))
