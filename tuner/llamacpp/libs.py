"""ctypes handles to the ggml/llama shared libraries that ship inside the installed llama_cpp package.

llama_cpp loads libllama.so (and through it libggml*.so) with RTLD_GLOBAL; opening the same files again
returns the same handles, so the backend registry and the RPC client state are shared with llama_cpp.
Nothing here imports llama_cpp before a function is called: the tuner core stays free of it.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path
from types import ModuleType

from tuner.errors import InventoryError

# enum ggml_backend_dev_type (ggml-backend.h)
GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2
GGML_BACKEND_DEVICE_TYPE_ACCEL = 3

# The mangled C++ symbol of `llama_memory_breakdown llama_get_memory_breakdown(const llama_context *)`
# (src/llama-ext.h): the only API that gives exact per-buffer-type bytes, also after a no_alloc dry run.
MEMORY_BREAKDOWN_SYMBOL = "_Z26llama_get_memory_breakdownPK13llama_context"
# int32_t llama_model_n_devices(const llama_model *) and ggml_backend_dev_t llama_model_get_device(
# const llama_model *, int): also C++ linkage in src/llama-ext.h, plain arguments, safe through ctypes.
MODEL_N_DEVICES_SYMBOL = "_Z21llama_model_n_devicesPK11llama_model"
MODEL_GET_DEVICE_SYMBOL = "_Z22llama_model_get_devicePK11llama_modeli"


class LlamaCppMissingError(InventoryError):
    """llama-cpp-python is not installed, or was built without the RPC backend."""


@functools.cache
def llama_cpp_module() -> ModuleType:
    """Import llama_cpp on first use; the error says how to get a build with RPC support."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppMissingError(
            f"llama-cpp-python cannot be imported ({exc}); install it with "
            "CMAKE_ARGS='-DGGML_RPC=on' pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36"
        ) from exc
    return llama_cpp


def lib_dir() -> Path:
    """The folder holding libllama.so and the libggml*.so files of the installed llama_cpp."""
    module_file = llama_cpp_module().__file__
    if module_file is None:  # a namespace package: not an installed llama_cpp
        raise LlamaCppMissingError("llama_cpp has no __file__; reinstall llama-cpp-python")
    return Path(module_file).parent / "lib"


def _loaded_paths() -> set[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux: fall back to the SONAME file names below
        return set()


def _open(stem: str) -> ctypes.CDLL:
    """Open the copy of ``<stem>.so`` that libllama.so itself uses.

    pip installs the .so / .so.0 / .so.0.x.y symlinks as three separate files, and libllama.so links the
    SONAME files (libggml.so.0, ...). Opening plain libggml.so would load a SECOND copy of ggml with its
    own backend registry: RPC devices registered there are invisible to llama.cpp (which is why
    Llama() seemed to ignore registered RPC devices). So prefer the file already mapped, then the SONAME.
    """
    folder = lib_dir()
    candidates = [folder / f"{stem}.so.0", folder / f"{stem}.so"]
    loaded = _loaded_paths()
    path = next((c for c in candidates if str(c) in loaded), None)
    path = path or next((c for c in candidates if c.exists()), None)
    if path is None:
        hint = ""
        if stem == "libggml-rpc":
            hint = (
                "; llama-cpp-python was built without RPC: rebuild with CMAKE_ARGS='-DGGML_RPC=on' "
                "pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36"
            )
        raise LlamaCppMissingError(f"{candidates[-1]} does not exist{hint}")
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def _declare(lib: ctypes.CDLL, name: str, argtypes: list[type], restype: type | None) -> None:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype


_P = ctypes.c_void_p
_SIZE_P = ctypes.POINTER(ctypes.c_size_t)


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base.so: device/registry/buffer-type accessors and ggml_type_name."""
    llama_cpp_module()
    lib = _open("libggml-base")
    _declare(lib, "ggml_backend_dev_name", [_P], ctypes.c_char_p)
    _declare(lib, "ggml_backend_dev_description", [_P], ctypes.c_char_p)
    _declare(lib, "ggml_backend_dev_memory", [_P, _SIZE_P, _SIZE_P], None)
    _declare(lib, "ggml_backend_dev_type", [_P], ctypes.c_int)
    _declare(lib, "ggml_backend_dev_backend_reg", [_P], _P)
    _declare(lib, "ggml_backend_dev_buffer_type", [_P], _P)
    _declare(lib, "ggml_backend_reg_name", [_P], ctypes.c_char_p)
    _declare(lib, "ggml_backend_reg_dev_count", [_P], ctypes.c_size_t)
    _declare(lib, "ggml_backend_reg_dev_get", [_P, ctypes.c_size_t], _P)
    _declare(lib, "ggml_backend_buft_name", [_P], ctypes.c_char_p)
    _declare(lib, "ggml_backend_buft_is_host", [_P], ctypes.c_bool)
    _declare(lib, "ggml_backend_buft_get_device", [_P], _P)
    _declare(lib, "ggml_type_name", [ctypes.c_int], ctypes.c_char_p)
    return lib


@functools.cache
def ggml() -> ctypes.CDLL:
    """libggml.so: the global backend registry (register, enumerate, CPU device)."""
    llama_cpp_module()  # loads libllama.so first so that every library comes from the same folder
    lib = _open("libggml")
    _declare(lib, "ggml_backend_register", [_P], None)
    _declare(lib, "ggml_backend_dev_count", [], ctypes.c_size_t)
    _declare(lib, "ggml_backend_dev_get", [ctypes.c_size_t], _P)
    _declare(lib, "ggml_backend_dev_by_type", [ctypes.c_int], _P)
    _declare(lib, "ggml_backend_dev_by_name", [ctypes.c_char_p], _P)
    return lib


@functools.cache
def ggml_rpc() -> ctypes.CDLL:
    """libggml-rpc.so: the RPC client (add_server) and server (start_server)."""
    llama_cpp_module()
    lib = _open("libggml-rpc")
    _declare(lib, "ggml_backend_rpc_add_server", [ctypes.c_char_p], _P)
    _declare(
        lib,
        "ggml_backend_rpc_start_server",
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(_P)],
        None,
    )
    _declare(lib, "ggml_backend_rpc_get_device_memory", [ctypes.c_char_p, ctypes.c_uint32, _SIZE_P, _SIZE_P], None)
    return lib


@functools.cache
def llama() -> ctypes.CDLL:
    """libllama.so, for the C++ memory-breakdown symbol that llama_cpp does not bind."""
    # llama_cpp loaded libllama.so by its plain name; reuse that very handle.
    lib = llama_cpp_module().llama_cpp._lib
    _declare(lib, MEMORY_BREAKDOWN_SYMBOL, [_P, _P], _P)
    _declare(lib, MODEL_N_DEVICES_SYMBOL, [_P], ctypes.c_int32)
    _declare(lib, MODEL_GET_DEVICE_SYMBOL, [_P, ctypes.c_int], _P)
    return lib


def model_devices(model: int) -> list[int]:
    """The devices a loaded llama_model uses, in llama.cpp's order (what tensor_split indexes)."""
    lib = llama()
    n_devices = getattr(lib, MODEL_N_DEVICES_SYMBOL)(model)
    return [getattr(lib, MODEL_GET_DEVICE_SYMBOL)(model, i) for i in range(n_devices)]


def memory_breakdown_supported() -> bool:
    """True where llama_get_memory_breakdown can be called through ctypes.

    It returns a std::map by value; on x86-64 SysV the hidden result pointer is the first integer
    argument, so ctypes can pass it. On AArch64 it goes in x8, which ctypes cannot set.
    """
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


class _BreakdownValue(ctypes.Structure):
    # std::pair<ggml_backend_buffer_type_t const, llama_memory_breakdown_data>
    _fields_ = [
        ("buft", _P),
        ("model", ctypes.c_size_t),
        ("context", ctypes.c_size_t),
        ("compute", ctypes.c_size_t),
    ]


class _RbNodeBase(ctypes.Structure):
    pass


_RbNodeBase._fields_ = [
    ("color", ctypes.c_int),
    ("parent", ctypes.POINTER(_RbNodeBase)),
    ("left", ctypes.POINTER(_RbNodeBase)),
    ("right", ctypes.POINTER(_RbNodeBase)),
]


class _StdMap(ctypes.Structure):
    # libstdc++'s _Rb_tree_impl: the empty comparator (padded to 8 bytes), the header node, the node count.
    # This layout has been the libstdc++ ABI since GCC 3.4.
    _fields_ = [
        ("compare", ctypes.c_size_t),
        ("header", _RbNodeBase),
        ("node_count", ctypes.c_size_t),
    ]


def memory_breakdown(ctx: int) -> list[tuple[int, int, int, int]]:
    """Call llama_get_memory_breakdown(ctx): one (buft pointer, model, context, compute) per buffer type.

    The returned std::map is read in place and then leaked (a few hundred bytes; callers run in a
    short-lived child process), because its destructor is a template that libllama.so does not export.
    """
    if not memory_breakdown_supported():
        raise LlamaCppMissingError(
            f"llama_get_memory_breakdown cannot be called through ctypes on {platform.machine()}; "
            "use the log-parsed sizes (rounded to 0.01 MiB) instead"
        )
    fn = getattr(llama(), MEMORY_BREAKDOWN_SYMBOL)
    result = _StdMap()
    fn(ctypes.addressof(result), ctx)

    header_addr = ctypes.addressof(result) + _StdMap.header.offset
    rows: list[tuple[int, int, int, int]] = []
    # Depth-first walk from the root (header.parent); the map has one node per buffer type, so a few.
    stack = [result.header.parent]
    while stack:
        node = stack.pop()
        if not node or ctypes.addressof(node.contents) == header_addr:
            continue
        value = _BreakdownValue.from_address(ctypes.addressof(node.contents) + ctypes.sizeof(_RbNodeBase))
        rows.append((value.buft or 0, value.model, value.context, value.compute))
        stack.extend((node.contents.left, node.contents.right))
    if len(rows) != result.node_count:
        raise LlamaCppMissingError(
            f"llama_get_memory_breakdown returned {result.node_count} entries but {len(rows)} were read; "
            "the std::map layout of this libstdc++ is not the expected one"
        )
    return rows
