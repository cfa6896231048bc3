"""Writing files so that nothing is lost: each file appears whole or not at all, one process writes into a
folder at a time, and a write that fails (a full disk) is one line saying which file.

    atomic_write(path, write)   write(f) fills a temporary file beside `path`; fsync; rename onto `path`
    locked(folder)              holds folder/.lock for one process (the kernel drops the lock when the process
                                dies, even by SIGKILL, so a crash never leaves a stale lock behind)
    remove_leftovers(folder)    the temporary files of writers that died before their rename
A rename within one folder is atomic on POSIX file systems: a reader, or the next run after a crash, sees the
old file or the new one, never half of one.

Test hook: SIGRL_TEST_SIGNAL="<file name>#<n>:<SIGNAL>" (e.g. "last.pt#2:KILL") sends SIGNAL to this process
just before the n-th rename onto a file of that name, so the tests can kill or interrupt a run at a chosen
point. It is read here and nowhere else.
"""
import contextlib
import errno
import os
import signal
import stat

from support.errors import WriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK = ".lock"



def _reason(err):
    """The OSError behind `err` (torch.save reports a failed write as a RuntimeError raised from it)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__context__
    return err


def _tmp_name(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def atomic_write(path, write):
    """Call write(f) on a temporary binary file beside `path`, flush it to disk, then rename it onto `path`.
    On any failure (a full disk, Ctrl-C) the temporary file is removed and `path` is untouched."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _test_signal(path)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = _reason(err) if isinstance(err, (OSError, RuntimeError)) else None
        if cause is None:
            raise
        raise WriteError(f"cannot write {path} ({cause.strerror or cause})") from None
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _fsync_folder(folder):
    """Make the rename itself durable (a power cut after it must not bring the old name back)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_leftovers(folder):
    """Remove temporary files that atomic_write left when its process was killed (call it under `locked`)."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp-" in name:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


PID_BYTES = 20  # what a lock file holds: this module writes a pid and nothing else


def _open_lock(path):
    """The lock file, opened for reading and writing without following a link: made new (O_EXCL), or else an
    existing regular file with one name whose content is a pid, as this module writes it. Anything else (a
    symbolic or hard link to another file, a file of other content) is refused, never truncated."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644), "r+")
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDWR | nofollow)
    except OSError as err:
        if err.errno == errno.ELOOP or os.path.islink(path):
            raise WriteError(f"{path} is a symbolic link, not a lock file this program wrote; remove it") from None
        raise
    f = os.fdopen(fd, "r+")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > PID_BYTES or \
            not f.read(PID_BYTES + 1).strip().isdigit() and st.st_size:
        f.close()
        raise WriteError(f"{path} is not a lock file this program wrote (expected a file holding a process id); "
                         f"remove it if it is not yours")
    return f


@contextlib.contextmanager
def locked(folder, wait=False):
    """Hold folder/.lock for the duration; a second process is refused with the first one's pid (or, with
    wait=True, waits for it). The lock file is removed when the holder is done (a finished run leaves none), and
    a folder this call created is removed again if nothing else is in it."""
    created = not os.path.isdir(folder)
    path = os.path.join(folder, LOCK)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise WriteError(f"cannot write into {folder} ({err.strerror})") from None
    f = _acquire(folder, path, wait)
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield folder
    finally:
        # removed while still held, so no other process is between its open and its flock of this same file
        # unnoticed: one that locks the removed file sees that it is gone and opens the new one (_acquire)
        with contextlib.suppress(OSError):
            os.remove(path)
        f.close()  # closing the file releases the lock
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty


def _acquire(folder, path, wait):
    """The lock file, open and locked by this process: opened again when the file locked is no longer the one at
    `path` (its holder removed it on release, between this process's open and its flock)."""
    while True:
        try:
            f = _open_lock(path)
        except OSError as err:
            raise WriteError(f"cannot write into {folder} ({err.strerror})") from None
        if fcntl is None:
            return f
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise WriteError(f"{folder} is in use by another process (pid {holder}): wait "
                             f"for it to finish, or choose another folder") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


_fired = {"spec": None, "count": 0}


def _test_signal(path):
    spec = os.environ.get("SIGRL_TEST_SIGNAL")
    if not spec:
        return
    target, name = spec.rsplit(":", 1)
    base, n = target.rsplit("#", 1)
    if _fired["spec"] != spec:  # a new setting counts from zero
        _fired.update(spec=spec, count=0)
    if os.path.basename(path) == base:
        _fired["count"] += 1
        if _fired["count"] == int(n):
            _fired["spec"] = None
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
