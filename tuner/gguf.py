"""A lazy GGUF header reader: hyper-parameters and tensor sizes without parsing arrays or touching weights.

gguf-py's GGUFReader parses every metadata array eagerly (seconds on a 262k-token vocabulary); planning needs
only scalars, a few small per-layer arrays and the tensor table. Large arrays are skipped by their byte length;
string arrays (the tokenizer) by walking their length prefixes. The `gguf` package still supplies the
constants: value types, key names and quantisation block sizes.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tuner.architectures import (
    KNOWN_ARCHITECTURES,
    RECURRENT_ARCHITECTURES,
    SWA_PATTERNS,
    swa_layers_from_pattern,
)
from tuner.errors import GGUFError
from tuner.model import ModelInfo, TensorInfo

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays up to this many items are decoded (per-layer hyper-parameters); longer ones are skipped.
MAX_DECODED_ARRAY = 4096
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SCALAR_STRUCTS = {kind: struct.Struct(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

Grow = Callable[[int], bytes]
"""``grow(n)`` returns the file's first ``n`` bytes or more (fewer only where the file ends): a remote file
read by ranges (tuner.hub) hands the parser a prefix that grows only as far as the header needs."""
Header = tuple[dict[str, object], list[TensorInfo]]
PartReader = Callable[[str, int], Header]


class _Cursor:
    """Reads little-endian GGUF primitives from a memory map, failing with GGUFError at the end of the data.

    With ``grow`` the data is a prefix of the file that is extended on demand instead of ending there.
    """

    def __init__(self, data: mmap.mmap | bytes, path: str, grow: Grow | None = None) -> None:
        self.data = data
        self.pos = 0
        self.path = path
        self.size = len(data)
        self.grow = grow

    def _need(self, n_bytes: int) -> None:
        if self.pos + n_bytes > self.size and self.grow is not None:
            self.data = self.grow(self.pos + n_bytes)
            self.size = len(self.data)
        if self.pos + n_bytes > self.size:
            raise GGUFError(
                f"{self.path}: truncated GGUF header (needs {self.pos + n_bytes:,} bytes, file has "
                f"{self.size:,}); the download or copy is incomplete"
            )

    def u32(self) -> int:
        self._need(4)
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        self._need(8)
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def string(self) -> str:
        length = self.u64()
        self._need(length)
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return bytes(raw).decode("utf-8", errors="replace")

    def scalar(self, kind: int) -> object:
        if kind == GGUFValueType.STRING:
            return self.string()
        fmt = _SCALAR_STRUCTS.get(kind)
        if fmt is None:
            raise GGUFError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}; the file is corrupt")
        self._need(fmt.size)
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return value

    def skip_strings(self, count: int) -> None:
        # The tokenizer's string arrays are the bulk of a header; walk the length prefixes without decoding.
        data, pos, unpack = self.data, self.pos, _U64.unpack_from
        end = self.size
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self._need(8)
                data, end = self.data, self.size  # a growing source has handed over a longer prefix
            pos += 8 + unpack(data, pos)[0]
        self.pos = pos
        self._need(0)

    def value(self, kind: int) -> object:
        """A value; long arrays come back as ``_SkippedArray`` (only their length is kept)."""
        if kind != GGUFValueType.ARRAY:
            return self.scalar(kind)
        item_kind = self.u32()
        count = self.u64()
        if item_kind == GGUFValueType.STRING:
            if count <= MAX_DECODED_ARRAY:
                return [self.string() for _ in range(count)]
            self.skip_strings(count)
            return _SkippedArray(count)
        fmt = _SCALAR_STRUCTS.get(item_kind)
        if fmt is None:
            raise GGUFError(f"{self.path}: unsupported GGUF array item type {item_kind}; the file is corrupt")
        n_bytes = fmt.size * count
        self._need(n_bytes)
        if count <= MAX_DECODED_ARRAY:
            values = list(struct.unpack_from(f"<{count}{fmt.format[-1]}", self.data, self.pos))
            self.pos += n_bytes
            return values
        self.pos += n_bytes
        return _SkippedArray(count)


class _SkippedArray:
    """Placeholder for a metadata array too long to be worth decoding (tokens, scores, merges)."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


def _read_header(path: str, file_index: int) -> Header:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                head = handle.read(4)
                if head != GGUF_MAGIC:
                    raise GGUFError(f"{path}: not a GGUF file (it starts with {head!r}, expected b'GGUF')")
                raise GGUFError(f"{path}: truncated GGUF header ({size} bytes); the file is incomplete")
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as exc:
        raise GGUFError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from exc
    except PermissionError as exc:
        raise GGUFError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return _parse_header(data, path, file_index)
    finally:
        data.close()


def read_header(grow: Grow, name: str, file_index: int = 0) -> Header:
    """Parse the header of a GGUF whose bytes arrive on demand (see ``Grow``); ``name`` is used in errors."""
    return _parse_header(grow(24), name, file_index, grow)


def _parse_header(data: mmap.mmap | bytes, path: str, file_index: int, grow: Grow | None = None) -> Header:
    cursor = _Cursor(data, path, grow)
    if data[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {bytes(data[:4])!r}, expected b'GGUF')")
    cursor.pos = 4
    version = cursor.u32()
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)")
    n_tensors = cursor.u64()
    n_kv = cursor.u64()
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFError(f"{path}: implausible header ({n_tensors:,} tensors, {n_kv:,} keys); the file is corrupt")

    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.u32())

    raw_tensors: list[tuple[str, int, tuple[int, ...], int]] = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.u32()
        if n_dims > 4:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most 4); the file is corrupt")
        shape = tuple(cursor.u64() for _ in range(n_dims))
        ggml_type = cursor.u32()
        offset = cursor.u64()
        raw_tensors.append((name, ggml_type, shape, offset))

    alignment = _optional_int(metadata.get("general.alignment"), DEFAULT_ALIGNMENT, "general.alignment", path)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, ggml_type, shape, offset in raw_tensors:
        n_bytes = _tensor_bytes(name, ggml_type, shape, path)
        tensors.append(TensorInfo(name, ggml_type, shape, n_bytes, data_start + offset, file_index))
    return metadata, tensors


def _tensor_bytes(name: str, ggml_type: int, shape: tuple[int, ...], path: str) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from exc
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if shape and shape[0] % block_size:
        raise GGUFError(f"{path}: tensor {name!r} row of {shape[0]} is not a multiple of its block {block_size}")
    return n_elements // block_size * type_size


def split_paths(path: str | os.PathLike[str]) -> list[str]:
    """Every file of a split GGUF (``name-00001-of-00003.gguf``) in order; a plain GGUF is its own list."""
    path = Path(path)
    match = SPLIT_NAME.match(path.name)
    if not match:
        return [str(path)]
    count = int(match["count"])
    return [str(path.with_name(f"{match['prefix']}-{no:05d}-of-{count:05d}.gguf")) for no in range(1, count + 1)]


def read_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read what planning needs from a GGUF (all files of a split model)."""
    paths = split_paths(path)

    def read_part(part: str, file_index: int) -> Header:
        if file_index and not os.path.exists(part):
            raise GGUFError(f"{part}: missing part {file_index + 1} of {len(paths)} of a split model")
        return _read_header(part, file_index)

    return read_split_model(paths, read_part)


def read_split_model(paths: Sequence[str], read_part: PartReader) -> ModelInfo:
    """The model whose files are ``paths`` (one, or every part of a split GGUF in order), each header read by
    ``read_part(path, file_index)``: a local file, or a remote one read by ranges."""
    metadata, tensors = read_part(paths[0], 0)
    split_count = _optional_int(metadata.get("split.count"), 1, "split.count", paths[0])
    if split_count > 1 and len(paths) == 1:
        raise GGUFError(
            f"{paths[0]}: part of a {split_count}-file split model but its name does not follow "
            f"NAME-00001-of-{split_count:05d}.gguf; rename the parts or merge them with llama-gguf-split"
        )
    for file_index, part in enumerate(paths[1:], start=1):
        _, part_tensors = read_part(part, file_index)
        tensors.extend(part_tensors)
    return _model_from_header(paths, metadata, tensors)


def _model_from_header(paths: Sequence[str], metadata: dict[str, object], tensors: list[TensorInfo]) -> ModelInfo:
    where = paths[0]
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{where}: no general.architecture key; not a llama.cpp model file")
    if arch not in KNOWN_ARCHITECTURES:
        raise GGUFError(f"{where}: unknown architecture {arch!r}; llama.cpp 0.3.36 cannot load it")
    if arch in RECURRENT_ARCHITECTURES:
        raise GGUFError(
            f"{where}: architecture {arch!r} keeps a recurrent state; the tuner models KV-cache transformers only"
        )

    def key(name: str, default: object = None) -> object:
        return metadata.get(f"{arch}.{name}", default)

    def int_key(name: str, default: int) -> int:
        return _optional_int(metadata.get(f"{arch}.{name}"), default, f"{arch}.{name}", where)

    n_layer = _as_int(key("block_count"), f"{arch}.block_count", where)
    n_embd = _as_int(key("embedding_length"), f"{arch}.embedding_length", where)
    n_head = _per_layer(key("attention.head_count"), n_layer, f"{arch}.attention.head_count", where)
    n_head_kv = _per_layer(key("attention.head_count_kv", list(n_head)), n_layer, "head_count_kv", where)
    n_ff = _per_layer(key("feed_forward_length", 0), n_layer, f"{arch}.feed_forward_length", where)
    # llama_model::load_hparams: n_embd / n_head() of layer 0, not the widest layer (OpenELM's vary)
    head_default = n_embd // n_head[0] if n_head[0] else 0
    n_embd_head_k = int_key("attention.key_length", head_default)
    n_embd_head_v = int_key("attention.value_length", head_default)

    names = {t.name: t for t in tensors}
    token_embd = names.get("token_embd.weight")
    if token_embd is not None and len(token_embd.shape) >= 2:
        n_vocab = token_embd.shape[1]
    else:
        tokens = metadata.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list | _SkippedArray) else int_key("vocab_size", 0)

    n_swa = int_key("attention.sliding_window", 0)
    swa_layers: tuple[bool, ...] = (False,) * n_layer
    if n_swa > 0:
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa_layers = tuple(bool(v) for v in pattern[:n_layer])
        else:
            n_pattern, dense_first = SWA_PATTERNS.get(arch, (0, False))
            if isinstance(pattern, int):
                n_pattern = pattern
            swa_layers = swa_layers_from_pattern(n_layer, n_pattern, dense_first)

    scalars = {k: v for k, v in metadata.items() if not isinstance(v, (list, _SkippedArray))}
    template = metadata.get("tokenizer.chat_template")
    file_type = metadata.get("general.file_type")
    return ModelInfo(
        paths=tuple(paths),
        architecture=arch,
        name=str(metadata.get("general.name") or Path(paths[0]).stem),
        file_type=None if file_type is None else _as_int(file_type, "general.file_type", where),
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=int_key("context_length", 0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_embd_head_k=n_embd_head_k,
        n_embd_head_v=n_embd_head_v,
        n_swa=n_swa,
        swa_layers=swa_layers,
        n_expert=int_key("expert_count", 0),
        n_expert_used=int_key("expert_used_count", 0),
        n_ff_exp=int_key("expert_feed_forward_length", 0),
        tensors=tuple(tensors),
        chat_template=template if isinstance(template, str) else None,
        metadata=scalars,
    )


def _optional_int(value: object, default: int, name: str, where: str) -> int:
    """An optional integer key: ``default`` when absent, a GGUFError when present with another type."""
    return default if value is None else _as_int(value, name, where)


def _as_int(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{where}: missing or invalid {name} ({value!r}); the file is not a complete model")
    return value


def _per_layer(value: object, n_layer: int, name: str, where: str) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) < n_layer:
            raise GGUFError(f"{where}: {name} has {len(value)} entries for {n_layer} layers")
        return tuple(int(v) for v in value[:n_layer])
    return (_as_int(value, name, where),) * n_layer
