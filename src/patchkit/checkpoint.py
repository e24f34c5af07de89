"""Reading safetensors checkpoints tensor by tensor, and finding a tensor again later.

The loader (:mod:`patchkit.loading`) checks every file's header up front (listed shards present,
header well formed, every tensor inside the file, dtypes known), then reads the tensors through a
:class:`ShardReader`: on Linux the file is memory-mapped copy-on-write and a tensor the loader hands
straight to a quantizer is a view of the page cache (no copy); every other tensor is copied out,
and each tensor's pages are dropped from the process (``madvise(MADV_DONTNEED)``) as soon as it is
done with, so no mapped file stays resident. Elsewhere it reads with plain positioned reads. A
:class:`TensorSource` says where one tensor came from (file, key, byte range, file size and, when
asked for, a SHA-256 of the bytes read); :meth:`TensorSource.read` reads it back with safetensors'
memory-mapped ``safe_open`` and refuses if the file changed since.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PatchError, UnsupportedError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor was read from: enough to read it back and to notice that the file changed.

    ``begin``/``end`` are absolute byte offsets in ``file``; ``file_size`` the file's size when it
    was read; ``digest`` the SHA-256 (hex) of the tensor's bytes as read, or ``None`` when the
    load was not asked to fingerprint.
    """

    file: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file_size: int
    digest: str | None = None

    def read(self, where: str = "") -> torch.Tensor:
        """The tensor as stored, read through ``safe_open`` (memory-mapped), on the CPU.

        Raises :class:`PatchError` naming the file and the tensor when the file is gone, has another
        size, no longer holds the tensor with this dtype and shape, or (with a digest) holds other bytes.
        """
        label = f"{where}: " if where else ""
        if not os.path.isfile(self.file):
            raise PatchError(f"{label}the checkpoint file {self.file!r} (tensor {self.key!r}) is gone")
        size = os.path.getsize(self.file)
        if size != self.file_size:
            raise PatchError(
                f"{label}the checkpoint file {self.file!r} changed since loading ({self.file_size} bytes then, {size} "
                f"now); tensor {self.key!r} cannot be read back as it was"
            )
        from safetensors import safe_open

        try:
            with safe_open(self.file, framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(self.key)
        except Exception as exc:  # safetensors raises its own error types for a bad file or key
            raise PatchError(
                f"{label}cannot read tensor {self.key!r} back from {self.file!r} ({type(exc).__name__}: {exc})"
            ) from exc
        if tensor.dtype != DTYPES.get(self.dtype) or tuple(tensor.shape) != self.shape:
            raise PatchError(
                f"{label}{self.file!r} now holds {self.key!r} as {tuple(tensor.shape)} {tensor.dtype}, not the "
                f"{self.shape} {self.dtype} tensor loaded from it"
            )
        if self.digest is not None and digest_of(tensor) != self.digest:
            raise PatchError(
                f"{label}the bytes of tensor {self.key!r} in {self.file!r} changed since loading (SHA-256 differs)"
            )
        return tensor


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU uint8 tensor (no copy)."""
    array: Any = tensor.numpy()
    return memoryview(array)


def digest_of(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a CPU tensor's bytes in row-major order."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(_bytes(flat)).hexdigest()


@dataclass
class Entry:
    """One tensor of a checkpoint file, from its header."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored values."""
        return DTYPES[self.dtype]


@dataclass
class Checkpoint:
    """Every tensor of a local safetensors checkpoint (single file or sharded with an index)."""

    folder: str
    files: list[str]
    entries: dict[str, Entry]
    sizes: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] | None = None

    def by_file(self) -> Iterator[tuple[str, list[Entry]]]:
        """Each file with its entries in file order (sequential reads)."""
        for name in self.files:
            yield name, sorted((e for e in self.entries.values() if e.file == name), key=lambda e: e.begin)

    def source(self, entry: Entry, digest: str | None = None) -> TensorSource:
        """A :class:`TensorSource` for ``entry``."""
        return TensorSource(
            entry.file, entry.key, entry.dtype, entry.shape, entry.begin, entry.end, self.sizes[entry.file], digest
        )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Find and check the checkpoint at ``path`` (a folder, or one ``.safetensors`` file).

    Reads only the headers. Raises :class:`UnsupportedError` naming the file (and tensor) for a
    missing folder or file, a shard listed in the index but absent, a tensor the index places in a
    shard that lacks it, a malformed header, an unknown dtype, or a truncated file.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        folder, files, index = os.path.dirname(os.path.abspath(path)), [os.path.abspath(path)], None
    elif os.path.isdir(path):
        folder = os.path.abspath(path)
        index_file = os.path.join(folder, INDEX_NAME)
        single = os.path.join(folder, SINGLE_NAME)
        if os.path.isfile(index_file):
            try:
                with open(index_file) as fh:
                    index = json.load(fh)
                weight_map = dict(index["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UnsupportedError(f"{index_file}: not a safetensors index ({type(exc).__name__}: {exc})") from exc
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                name = os.path.join(folder, shard)
                if not os.path.isfile(name):
                    raise UnsupportedError(
                        f"{index_file} lists the shard {shard!r} (for e.g. tensor "
                        f"{next(k for k, v in weight_map.items() if v == shard)!r}) but {name} does not exist"
                    )
                files.append(name)
        elif os.path.isfile(single):
            files, index = [single], None
        else:
            others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".gguf")))
            hint = f" (found {others[:3]}: only safetensors checkpoints are streamed)" if others else ""
            raise UnsupportedError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder}{hint}")
    else:
        raise UnsupportedError(f"checkpoint {path!r} does not exist (a local folder or .safetensors file is needed)")
    entries: dict[str, Entry] = {}
    sizes: dict[str, int] = {}
    metadata: dict[str, Any] = {}
    for name in files:
        found, meta, sizes[name] = _read_header(name)
        metadata.update(meta)
        for entry in found:
            if entry.key in entries:
                raise UnsupportedError(f"tensor {entry.key!r} is stored twice: in {entries[entry.key].file} and {name}")
            entries[entry.key] = entry
    if index is not None:
        for key, shard in index["weight_map"].items():
            listed = entries.get(key)
            if listed is None or os.path.basename(listed.file) != shard:
                raise UnsupportedError(
                    f"{INDEX_NAME} places tensor {key!r} in {shard!r}, but that file does not hold it"
                )
    return Checkpoint(folder, files, entries, sizes, metadata, index)


def _read_header(name: str) -> tuple[list[Entry], dict[str, Any], int]:
    size = os.path.getsize(name)
    with open(name, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnsupportedError(f"{name} is truncated ({size} bytes): not even a safetensors header length")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise UnsupportedError(
                f"{name} is truncated or not safetensors: its header claims {length} bytes, the file has {size}"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as exc:
        raise UnsupportedError(f"{name}: malformed safetensors header ({exc})") from exc
    start = 8 + length
    meta = header.pop("__metadata__", None) or {}
    out = []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedError(f"{name}: malformed header entry for tensor {key!r}: {info!r}") from exc
        if dtype not in DTYPES:
            raise UnsupportedError(f"{name}: tensor {key!r} has dtype {dtype!r}, which patchkit cannot load")
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if end - begin != numel * itemsize or begin < 0:
            raise UnsupportedError(
                f"{name}: tensor {key!r} ({dtype} {list(shape)}) spans {end - begin} bytes, not {numel * itemsize}"
            )
        if start + end > size:
            raise UnsupportedError(
                f"{name} is truncated: tensor {key!r} needs bytes up to {start + end}, the file has {size}"
            )
        out.append(Entry(key, name, dtype, shape, start + begin, start + end))
    return out, dict(meta), size


def read_entry(handle: Any, entry: Entry, *, fingerprint: bool) -> tuple[torch.Tensor, str | None]:
    """Read ``entry`` from the open binary file ``handle`` into a new CPU tensor (one copy, no mmap).

    Returns the tensor and, with ``fingerprint``, the SHA-256 of its bytes. Raises
    :class:`UnsupportedError` if the file ends early (it was truncated after the header check).
    """
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        handle.seek(entry.begin)
        got = handle.readinto(_bytes(buffer))
        if got != entry.nbytes:
            raise UnsupportedError(
                f"{entry.file} is truncated: tensor {entry.key!r} needs {entry.nbytes} bytes from offset "
                f"{entry.begin}, only {got} could be read"
            )
    digest = hashlib.sha256(_bytes(buffer)).hexdigest() if fingerprint else None
    return buffer.view(entry.torch_dtype).reshape(entry.shape), digest


_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # Linux's value (the mmap module does not export it)


@functools.cache
def _libc_mmap() -> Any:
    """libc's ``mmap`` (for :meth:`ShardReader._detach`), or ``None`` where it cannot be called."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return fn


def mapping_supported() -> bool:
    """Whether :class:`ShardReader` maps files (Linux: ``MADV_DONTNEED`` drops pages at once)."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED") and _libc_mmap() is not None


class Shared:
    """A tensor the reader handed out as a view of its mapping, until :meth:`ShardReader.done` with it."""

    __slots__ = ("entry", "ref", "address")

    def __init__(self, entry: Entry, tensor: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = tensor.untyped_storage()
        self.entry = entry
        self.address = storage.data_ptr()  # a tensor whose storage starts here still uses the view
        self.ref = StorageWeakRef(storage)  # alive while anything still uses the bytes


class ShardReader:
    """Reads the tensors of one checkpoint file.

    On Linux the file is mapped copy-on-write (``mmap`` ``ACCESS_COPY``: writes to a view never reach
    the file). :meth:`read` either copies a tensor out (to the dtype and device asked for) and drops
    its pages from the process at once, or, with ``share=True``, returns a view of the mapping (no
    copy) and a :class:`Shared` handle: the caller must pass that to :meth:`done` once nothing it
    knows of uses the view any more. ``done`` drops the pages, or, when something else still holds
    the bytes (a patcher that kept the tensor it was given), first turns them into private memory
    so that the tensor no longer depends on the file. The mapping itself goes away with the last
    view. Elsewhere every tensor is read with ``readinto`` into a buffer of its own.
    """

    def __init__(self, name: str, expected_size: int) -> None:
        self.name = name
        self._map: mmap.mmap | None = None
        self._base = 0
        self._file: Any = None
        self._detached: list[tuple[int, int]] = []  # page ranges now private memory: never dropped
        if not mapping_supported():
            self._file = open(name, "rb")  # noqa: SIM115 - closed by close()
            return
        with open(name, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < expected_size or size == 0:
                # The header check saw the file whole: it shrank since. read() names the tensor.
                self._file = open(name, "rb")  # noqa: SIM115 - closed by close()
                return
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        anchor = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(anchor)
        del anchor

    def close(self) -> None:
        """No more reads (:meth:`done` still works): the mapping goes with the reader and the last view."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(
        self, entry: Entry, dtype: torch.dtype, device: torch.device, *, fingerprint: bool, share: bool
    ) -> tuple[torch.Tensor, str | None, Shared | None]:
        """``entry`` as a ``dtype`` tensor on ``device``; the SHA-256 of its stored bytes with ``fingerprint``.

        ``share``: the caller may keep a view of the mapping (only taken for a CPU tensor that needs
        no cast and is naturally aligned); the third value is then its :class:`Shared` handle.
        Raises :class:`UnsupportedError` if the file ends early (it was truncated after the header check).
        """
        if self._map is None:
            value, digest = read_entry(self._file, entry, fingerprint=fingerprint)
            if value.dtype != dtype or device.type != "cpu":
                value = value.to(device=device, dtype=dtype)
            return value, digest, None
        if entry.end > len(self._map):  # pragma: no cover - a file that shrank under the mapping
            raise UnsupportedError(
                f"{entry.file} is truncated: tensor {entry.key!r} needs {entry.nbytes} bytes from offset "
                f"{entry.begin}, only {max(0, len(self._map) - entry.begin)} could be read"
            )
        stored = entry.torch_dtype
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=dtype, device=device), _sha256(b"") if fingerprint else None, None
        with memoryview(self._map) as whole:
            digest = _sha256(whole[entry.begin : entry.end]) if fingerprint else None
        view = torch.frombuffer(self._map, dtype=torch.uint8, count=entry.nbytes, offset=entry.begin)
        view = view.view(stored).reshape(entry.shape)
        aligned = (self._base + entry.begin) % view.element_size() == 0
        if share and aligned and dtype == stored and device.type == "cpu":
            return view, digest, Shared(entry, view)
        value = view.to(device=device, dtype=dtype, copy=True)
        del view
        self._drop(entry)
        return value, digest, None

    def done(self, shared: Shared) -> None:
        """Nothing the caller knows of uses ``shared``'s view any more: release its pages."""
        if shared.ref.expired():
            self._drop(shared.entry)
        else:
            self._detach(shared.entry)

    def _drop(self, entry: Entry) -> None:
        # Only pages wholly inside the tensor: a page it shares with a neighbour may still be in use.
        start = -(-entry.begin // _PAGE) * _PAGE
        stop = entry.end // _PAGE * _PAGE
        if any(start < end and begin < stop for begin, end in self._detached):
            return  # only a malformed file has overlapping tensors: keep what a detached one holds
        if self._map is not None and stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def _detach(self, entry: Entry) -> None:
        """Replace the tensor's pages, in place, by private anonymous memory holding the same bytes."""
        start = entry.begin // _PAGE * _PAGE
        stop = -(-entry.end // _PAGE) * _PAGE
        address, length = self._base + start, stop - start
        saved = ctypes.string_at(address, length)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
        got = _libc_mmap()(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if got != address:  # pragma: no cover - MAP_FIXED over our own mapping does not fail short of ENOMEM
            raise MemoryError(f"cannot detach tensor {entry.key!r} of {entry.file} from the file mapping")
        ctypes.memmove(address, saved, length)
        self._detached.append((start, stop))


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()
