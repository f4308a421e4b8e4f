"""Check a `.gguf` file's header before transformers builds a model from it.

transformers' GGUF loader trusts the header: a file whose metadata claims 10^6 blocks makes it build a config with 10^6
layers and allocate them, long before it notices the tensors are not there. `check_gguf` walks the header itself
(a memory map: nothing is copied, every length is checked against the bytes left before it is used, so a hostile header
costs at most one pass over the file) and refuses, in one line naming the file:
  - a file that is not GGUF, or whose header claims more tensors and keys than its bytes can hold;
  - a tensor whose data (shape x type size) reaches past the end of the file (a truncated download);
  - `<arch>.block_count` that differs from the blk.N tensors present, or blocks that skip a number;
  - `<arch>.embedding_length` that differs from the token embedding's width.
The `gguf` package's GGUFReader parses every token string into numpy objects (9 s for the embedded model's header);
this walk takes a tenth of a second.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

from medtune.errors import MedtuneError

MAGIC = b"GGUF"
# The fewest bytes one entry can take: a tensor info (name length 8 + 1 character, n_dims 4, one dim 8, type 4,
# offset 8) and a metadata key/value (key length 8 + 1 character, type 4, a one-byte value).
MIN_TENSOR_INFO = 33
MIN_KV = 14
BLOCK = re.compile(r"blk\.(\d+)\.")


def check_gguf(path: str | Path) -> None:
    """Raise MedtuneError (one line naming `path` and what is wrong) unless the GGUF header is consistent."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != MAGIC:
            _refuse(path, "not a GGUF file (no GGUF magic at its start)")
        if len(head) < 24:
            _refuse(path, f"truncated: {size} bytes, shorter than a GGUF header (24); copy or convert it again")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
        if version not in (2, 3):
            _refuse(path, f"GGUF version {version}; medtune reads versions 2 and 3")
        if n_tensors * MIN_TENSOR_INFO + n_kv * MIN_KV > size:
            _refuse(path, f"its header claims {n_tensors} tensors and {n_kv} metadata keys, more than its {size} "
                          "bytes can hold")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                meta, tensors, data_start = _walk(_Cursor(data, 24), n_tensors, n_kv)
            except _Short as e:
                _refuse(path, f"its header is cut short or corrupt ({e})")
    for name, dims, kind, offset in tensors:
        end = data_start + offset + _nbytes(path, name, dims, kind)
        if end > size:
            _refuse(path, f"tensor {name} ({'x'.join(map(str, dims))}) ends at byte {end}, past the end of the file "
                          f"({size} bytes): truncated")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        _refuse(path, "no general.architecture in its metadata")
    blocks = {int(m.group(1)) for name, *_ in tensors if (m := BLOCK.match(name))}
    claimed = meta.get(f"{arch}.block_count")
    if claimed is not None and claimed != len(blocks):
        _refuse(path, f"{arch}.block_count is {claimed} but the file holds tensors for {len(blocks)} blocks")
    if blocks and blocks != set(range(len(blocks))):
        missing = sorted(set(range(max(blocks) + 1)) - blocks)
        _refuse(path, f"its blocks skip numbers (no blk.{missing[0]}.*); it is not a whole model")
    width = meta.get(f"{arch}.embedding_length")
    embed = next((dims for name, dims, *_ in tensors if name == "token_embd.weight"), None)
    if width is not None and embed and embed[0] != width:
        _refuse(path, f"{arch}.embedding_length is {width} but token_embd.weight is {embed[0]} wide")


# GGUF value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Short(Exception):
    pass


class _Cursor:
    def __init__(self, data, pos: int):
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Short(f"{n} bytes wanted at byte {self.pos}, {max(len(self.data) - self.pos, 0)} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise _Short(f"{n} bytes wanted at byte {self.pos}, {len(self.data) - self.pos} left")
        self.pos += n


def _walk(c: _Cursor, n_tensors: int, n_kv: int) -> tuple[dict, list, int]:
    """(scalar and string metadata, [(name, dims, type, offset)], where tensor data starts)."""
    meta = {}
    for _ in range(n_kv):
        key, kind = c.string(), c.unpack("I")
        value = _value(c, kind, depth=0)
        if value is not None:
            meta[key] = value
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.unpack("I")
        if n_dims > 8:
            raise _Short(f"tensor {name[:80]} has {n_dims} dimensions")
        dims = [c.unpack("Q") for _ in range(n_dims)]
        tensors.append((name, dims, c.unpack("I"), c.unpack("Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Short(f"general.alignment {align!r} is not a power of two")
    return meta, tensors, -(-c.pos // align) * align


def _value(c: _Cursor, kind: int, depth: int):
    """A scalar or string value; arrays are skipped (their lengths checked against the bytes left)."""
    if kind in SCALARS:
        value = c.unpack(SCALARS[kind])
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if kind == STRING:
        return c.string()
    if kind != ARRAY or depth > 2:
        raise _Short(f"unknown value type {kind} at byte {c.pos}")
    item, count = c.unpack("I"), c.unpack("Q")
    if item in SCALARS:
        c.skip(count * struct.calcsize("<" + SCALARS[item]))
    else:
        if count * 8 > len(c.data) - c.pos:  # every string or array item takes at least 8 bytes
            raise _Short(f"an array claims {count} items at byte {c.pos}")
        for _ in range(count):
            _value(c, item, depth + 1)
    return None


def _nbytes(path: Path, name: str, dims: list[int], kind: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        _refuse(path, f"tensor {name} has unknown type {kind}")
    count = 1
    for d in dims:
        count *= d
    if dims and dims[0] % block:
        _refuse(path, f"tensor {name}: a row of {dims[0]} is not whole blocks of {block}")
    return count // block * type_size


def _refuse(path: Path, what: str):
    raise MedtuneError(f"{path}: {what}; refusing to load it (re-download or re-convert the GGUF)")
