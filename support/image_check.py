"""The start-up image check: every image a command uses is opened once before the first step, so a missing or
damaged file is reported at the start (never a crash hours into an epoch, never a silent black image).

NUS-WIDE has 269,648 images; decoding them costs minutes per start. So the verdicts are cached, one file per
list of paths, in <$SIGRL_CACHE or ~/.cache/sigrl>/images-<hash of the list>.npz, each verdict keyed by the
file's size, modification time and status-change time (ctime: a file rewritten with its size and modification
time put back still has a new one), the whole entry checksummed (support/caches.py): a second start over
unchanged files only stats them, a file that changed is decoded again, and a damaged cache is one warning. An
image that fails to load after passing the check (`forget_verdicts`) clears the cached verdicts, so the next
start decodes every image again. The decode runs in one thread per core (PIL decodes without the GIL). Under torchrun,
tasks.load_dataset runs on rank 0 first (parallel.in_turn), so rank 0 decodes and the others read its cache.
"""
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from support import caches, safe_io
from support.progress import progress

BLOCK = 4096  # paths per block of work: 270k paths never mean 270k pending futures
MAX_ASPECT = 50  # longer side / shorter side at most. Evaluation resizes the shorter side to 256 pixels (at
# R = 224), so a 30000 x 1 strip (a PNG of under 200 bytes) becomes 7.7 million pixels long: its transform peaked
# at 7.9 GiB more memory, a 50 x 1 one at 13 MiB (measured on CPU, torchvision's Resize, PIL images).


def shape_problem(size):
    """Why an image of `size` (width, height) is refused before any resize, in words, or ''."""
    w, h = size
    if min(w, h) < 1:
        return f"{w} x {h} pixels: empty"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return (f"{w} x {h} pixels: one side over {MAX_ASPECT} times the other, too thin to resize by its shorter "
                f"side within bounded memory; crop it")
    return ""


def cores():
    """The CPU cores this process may run on (a job scheduler's share, not the whole machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def unreadable(path):
    """'' when the file exists and decodes to its last byte, else why not, in words. JPEGs decode at 1/8 scale
    (cheap: the whole entropy-coded stream is still read, so a file cut short fails)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if shape_problem(im.size):
                return shape_problem(im.size)
            frames = getattr(im, "n_frames", 1)
            im.draft("RGB", (64, 64))
            try:
                im.load()
            except (OSError, ValueError, SyntaxError) as e:
                cut = "truncated" in str(e) or "broken data stream" in str(e)
                what = "truncated" if cut else f"{im.format or 'image'} data cannot be decoded"
                return f"{what}{f' (multi-page, {frames} pages)' if frames > 1 else ''}: {e}"
    except FileNotFoundError:
        return "no such file"
    except UnidentifiedImageError:
        return "unknown format (not an image file Pillow can read)"
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some malformed headers
        return str(e) or type(e).__name__
    return ""


def _stat(path):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns
    except OSError:
        return -1, -1, -1


def _cache_file(paths):
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(caches.cache_dir(), f"images-{digest}.npz")


def _read_cache(path, paths):
    """(stats (N, 3), reasons (N,)) cached at `path` for this list of paths, or None (not there yet; damaged or
    written for other paths: one warning, and everything is decoded again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stats, reasons, check = z["stats"], z["reasons"], str(z["sha256"])
        if check != caches.checksum(paths, [stats, reasons]) or stats.shape != (len(paths), 3):
            raise ValueError("its checksum does not match its paths and verdicts")
        return stats, reasons
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001  np.load raises BadZipFile, EOFError, ValueError, KeyError, ...
        caches.distrusted(path, f"damaged or foreign image-check cache ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:80]})")
        return None


def forget_verdicts():
    """Delete every cached image verdict: an image failed to load after the check passed it (rewritten since,
    or its disk fails), so no verdict is trusted; the next start decodes every image again."""
    for name in os.listdir(caches.cache_dir()) if os.path.isdir(caches.cache_dir()) else []:
        if name.startswith("images-") and name.endswith(".npz"):
            try:
                os.remove(os.path.join(caches.cache_dir(), name))
            except FileNotFoundError:  # another DataLoader worker removed it first
                pass


def check_images(paths, workers=None, cache=True, desc="checking images", out=None):
    """Open every image once -> (good_mask (N,) bool, bad paths, their reasons). Verdicts of files whose size and
    mtime match the cache are reused. The caller reports len(bad) and a few of them once, then drops them.
    out: where progress lines go when not on a terminal (support/progress.py; default stdout)."""
    paths = [os.fspath(p) for p in paths]
    stats = np.array([_stat(p) for p in paths], dtype=np.int64).reshape(-1, 3)  # (N, 3): size, mtime_ns, ctime_ns
    reasons = np.full(len(paths), None, dtype=object)
    file = _cache_file(paths) if cache and paths else None
    hit = _read_cache(file, paths) if file else None
    if hit is not None:
        same = (hit[0] == stats).all(axis=1) & (stats[:, 0] >= 0)  # (N,)
        reasons[same] = hit[1][same]
    todo = [i for i in range(len(paths)) if reasons[i] is None]
    if todo:
        with ThreadPoolExecutor(workers or cores()) as pool:
            for s in progress(range(0, len(todo), BLOCK), desc, unit="block", out=out):
                block = todo[s:s + BLOCK]
                reasons[block] = list(pool.map(unreadable, [paths[i] for i in block]))
        if file:
            try:
                os.makedirs(caches.cache_dir(), exist_ok=True)
                text = reasons.astype(str)  # (N,)
                safe_io.atomic_write(file, lambda f: np.savez(f, stats=stats, reasons=text,
                                                              sha256=caches.checksum(paths, [stats, text])))
            except (OSError, safe_io.WriteError) as err:  # a cache that cannot be written only costs time
                print(f"warning: image check not cached ({err})", file=sys.stderr)
    good = np.array([not r for r in reasons], dtype=np.bool_)
    bad = np.flatnonzero(~good)
    return good, [paths[i] for i in bad], [str(reasons[i]) for i in bad]
