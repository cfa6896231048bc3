"""The tensors of a TorchScript archive, read without compiling or running any of its code.

    python -m support.torchscript_files ViT-B-16.pt      # its tensors: name, dtype, shape

OpenAI ships CLIP as a TorchScript archive. `torch.jit.load` compiles the archive's code/ folder and runs it:
a class's `__setstate__` runs while loading, so a crafted file can write files or do anything else Python code
can. The weights do not need that code. The archive is a zip holding
  - <name>/data.pkl: a pickle (protocol 2) of the module tree: one `__torch__.<class>` object per module, whose
    state is a dict {attribute: value}; a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
    stride, requires_grad, hooks)`, and its storage a persistent id ("storage", torch.<Type>Storage, key,
    location, numel) whose bytes are the zip entry <name>/data/<key> (little-endian, as <name>/byteorder says);
  - <name>/code/ (the program as Python-like text), constants.pkl, ...: what torch.jit.load compiles.
`read_archive` refuses an archive whose code/ defines a `__setstate__` (found in the text, never compiled),
then unpickles data.pkl with an unpickler that knows six kinds of global (module objects, storage types, the
tensor rebuild, OrderedDict and TorchScript's typed-container helpers) and builds each of them itself; any
other global, or a module object whose state is not a plain dict (what a `__getstate__` of the archive's own
wrote), is refused with one line naming the file. Tensors are collected under their dotted names, as
`torch.jit.load(path).state_dict()` names them.
"""
import collections
import os
import pickle
import sys
import zipfile

import torch

from support import cli
from support.errors import CheckpointError

# torch.<Type>Storage -> the dtype of its elements (every type torch.jit.save writes for a dense tensor)
STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


def is_torchscript(path):
    """A zip with a constants.pkl beside its data.pkl: what torch.jit.save writes (torch.save's zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


class _Module:
    """What a `__torch__.<class>` object becomes: its class name and its state, nothing callable."""
    qualname, state = "", None

    def __setstate__(self, state):  # pickle's BUILD: store the state, never interpret it
        self.state = state


def _typed(value, *type_tag):
    """TorchScript's tag on a typed list or dict: the value itself."""
    return value


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive, prefix, path):
        super().__init__(file)
        self.archive, self.prefix, self.path, self.storages = archive, prefix, path, {}

    def refuse(self, why):
        raise CheckpointError(f"{self.path}: {why}; refused without running it (a TorchScript archive is read for "
                              f"its tensors only)")

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            # a fresh empty class per name: pickle's NEWOBJ needs a class, and nothing of the archive's runs in it
            return type(name, (_Module,), {"qualname": f"{module}.{name}"})
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _typed
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist"):
            return list
        self.refuse(f"data.pkl names the global {module}.{name}, which is not a tensor or a plain container")

    def persistent_load(self, pid):
        """("storage", dtype, key, location, numel) -> (dtype, the bytes of <prefix>/data/<key> as a storage)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            self.refuse(f"data.pkl holds a persistent id {str(pid)[:60]} that is not a storage record")
        _, dtype, key, _, numel = pid  # the location (cpu, cuda:0) is ignored: everything is read to the CPU
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise CheckpointError(f"{self.path}: {name} is missing (a damaged TorchScript archive)") from None
            expected = numel * dtype.itemsize
            if info.file_size != expected:
                raise CheckpointError(f"{self.path}: {name} holds {info.file_size} bytes, its record says "
                                      f"{expected} (a damaged TorchScript archive)")
            raw = self.archive.read(name)
            self.storages[key] = (dtype, torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw
                                  else torch.UntypedStorage(0))
        return self.storages[key]

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not (isinstance(storage, tuple) and isinstance(offset, int) and isinstance(size, tuple)
                and isinstance(stride, tuple) and len(size) == len(stride)
                and all(isinstance(n, int) and n >= 0 for n in size + stride) and offset >= 0):
            self.refuse("data.pkl rebuilds a tensor from arguments that are not a storage, offset, size and stride")
        dtype, raw = storage
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if (last + 1) * dtype.itemsize > raw.nbytes():
            raise CheckpointError(f"{self.path}: a tensor of size {list(size)} reaches past the end of its storage "
                                  f"(a damaged TorchScript archive)")
        return torch.empty(0, dtype=dtype).set_(raw, offset, size, stride)


def _tensors(root, path):
    """The tensors of a module tree under dotted names, as a state dict names them, after checking that every
    module object's state is an attribute dict: a tuple or anything else is what a scripted `__getstate__` wrote,
    for a `__setstate__` of the archive's own code to read back (code that would run inside torch.jit.load)."""
    out, todo, seen = {}, [("", root)], set()
    while todo:  # a loop, not recursion: a crafted file may nest modules deeper than Python's stack
        prefix, obj = todo.pop()
        if id(obj) in seen:  # a module reached twice (shared, or a pickle that points at itself) is read once
            continue
        seen.add(id(obj))
        if not isinstance(obj.state, dict) or not all(isinstance(k, str) for k in obj.state):
            raise CheckpointError(f"{path}: {obj.qualname} is restored by its own __setstate__ code (its state is "
                                  f"a {type(obj.state).__name__}, not the attribute dict of a plain module); "
                                  f"refused without running it")
        children = []
        for name, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _Module):
                children.append((f"{prefix}{name}.", value))
        todo.extend(reversed(children))  # depth first, in attribute order
    return out


def read_archive(path):
    """A TorchScript archive -> {dotted name: tensor}, as `torch.jit.load(path).state_dict()` but running nothing."""
    path = str(path)
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: a zip, but not a TorchScript archive (expected one <name>/data.pkl, "
                                      f"found {len(pickles)})")
            prefix = pickles[0].split("/")[0]
            on_disk = os.path.getsize(path)
            huge = [i.filename for i in z.infolist() if i.file_size > on_disk]
            if huge:  # torch.jit.save stores entries uncompressed: one larger than the file would be a zip bomb
                raise CheckpointError(f"{path}: {huge[0]} would unpack to more bytes than the whole archive holds; "
                                      f"not an archive torch.jit.save wrote")
            order = f"{prefix}/byteorder"
            if order in z.namelist() and z.read(order).strip() not in (b"little", b""):
                raise CheckpointError(f"{path}: its tensors are stored {z.read(order)[:10].decode(errors='replace')}"
                                      f"-endian; only little-endian archives are read")
            for name in z.namelist():  # read as text, never compiled: a class that restores itself is refused
                if name.startswith(f"{prefix}/code/") and name.endswith(".py") and b"def __setstate__" in z.read(name):
                    raise CheckpointError(f"{path}: {name} defines __setstate__, code that torch.jit.load would run "
                                          f"while loading; refused without running it (OpenAI's CLIP has none)")
            with z.open(pickles[0]) as f:
                root = _Unpickler(f, z, prefix, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, RecursionError, MemoryError,
            ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:100]
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({type(err).__name__}: {first})") from None
    if not isinstance(root, _Module):
        raise CheckpointError(f"{path}: a TorchScript archive whose data.pkl holds a {type(root).__name__}, "
                              f"not a module")
    return _tensors(root, path)


@cli.command
def main(argv=None):
    parser = cli.parser(prog="python -m support.torchscript_files",
                        description="List a TorchScript archive's tensors without running its code.")
    parser.add_argument("archive")
    for key, tensor in read_archive(parser.parse_args(argv).archive).items():
        print(f"{key:60s} {str(tensor.dtype):15s} {tuple(tensor.shape)}")


if __name__ == "__main__":
    sys.exit(main())
