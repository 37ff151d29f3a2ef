"""Capture llama.cpp's log and read what it allocated per buffer (model, KV, compute, output) from it.

The numbers come from the lines llama.cpp prints while loading (src/llama-model.cpp, llama-kv-cache.cpp,
llama-context.cpp); they are MiB rounded to 2 decimals, so each is exact to +-0.005 MiB
(``LOG_ROUNDING_BYTES``). ``tuner.llamacpp.load`` replaces them by exact bytes where it can.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Iterator
from typing import Any, Literal, TextIO

from pydantic import BaseModel, Field, computed_field

from tuner.llamacpp.device_usage import DeviceUsage

MiB = 1024 * 1024
# A value printed as "%8.2f MiB" is within half a hundredth of a MiB of the real size.
LOG_ROUNDING_BYTES = 5243  # ceil(0.005 * 2**20)

# enum ggml_log_level of this ggml (llama_cpp/_logger.py still has the older order, DEBUG = 4).
GGML_LOG_LEVEL_NONE = 0
GGML_LOG_LEVEL_DEBUG = 1
GGML_LOG_LEVEL_INFO = 2
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

BufferKind = Literal["model", "kv", "compute", "output"]
FlashAttnName = Literal["auto", "enabled", "disabled"]

# Buffers that live in host RAM. llama.cpp names them after the buffer type: CPU, CPU_Mapped (mmap),
# CPU_REPACK / AMX / KLEIDIAI (repacked weights), CUDA_Host / ROCm_Host (pinned staging memory).
_HOST_PREFIXES = ("CPU", "AMX", "KLEIDIAI")
_HOST_SUFFIXES = ("_Host",)


def is_host_buffer_name(name: str) -> bool:
    """Whether a buffer named like this sits in host RAM (used when the log is all there is)."""
    return name.startswith(_HOST_PREFIXES) or name.endswith(_HOST_SUFFIXES)


class BufferSizes(BaseModel):
    """Bytes llama.cpp allocated in one buffer type (one device, or one kind of host memory)."""

    model_bytes: int = 0
    kv_bytes: int = 0  # KV cache and recurrent state: llama.cpp's "context" memory
    compute_bytes: int = 0
    output_bytes: int = 0  # logits / embeddings of the last batch (always a host buffer)
    host: bool = False  # lives in host RAM (CPU, CPU_Mapped, repacked weights, pinned *_Host memory)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes


class KvCacheSummary(BaseModel):
    """One ``llama_kv_cache: size = ...`` line (an iSWA model prints one per cache)."""

    cells: int
    layers: int
    seqs: int
    type_k: str
    type_v: str
    bytes: int


class UsedDevice(BaseModel):
    """A ``llama_prepare_model_devices: using device ...`` line, in llama.cpp's device order."""

    name: str  # ggml device name: RPC0, CUDA0, ...
    description: str  # for an RPC device its endpoint
    free_bytes: int  # printed in whole MiB (rounded down)


class BufferReport(BaseModel):
    """What llama.cpp allocated for one model + context, keyed by the buffer names it prints."""

    buffers: dict[str, BufferSizes] = Field(default_factory=dict)
    # True when the model/KV/compute bytes are exact (llama_get_memory_breakdown); False when parsed
    # from the log, where each value is within LOG_ROUNDING_BYTES. Output bytes are always log-rounded.
    exact: bool = False
    # When exact: the log's own (rounded) figures, kept for comparison. After a dry run they are zeros,
    # because llama.cpp prints the size of its placeholder buffers.
    logged_buffers: dict[str, BufferSizes] = Field(default_factory=dict)
    devices: list[UsedDevice] = Field(default_factory=list)
    # ggml device name (RPC0) -> name of its buffers in the log (RPC0[127.0.0.1:50052]); set by load.py.
    device_buffer_names: dict[str, str] = Field(default_factory=dict)
    # Split mode tensor: each device before and after the load, measured outside llama.cpp, by buffer name.
    device_usage: dict[str, DeviceUsage] = Field(default_factory=dict)
    # layer index -> ggml device name; needs the DEBUG lines ("layer N assigned to device X").
    # Index n_layer is the output layer.
    layer_devices: dict[int, str] = Field(default_factory=dict)
    swa_layers: list[int] = Field(default_factory=list)
    n_layers_offloaded: int | None = None
    n_layers_offloadable: int | None = None
    n_seq_max: int | None = None
    n_ctx: int | None = None
    n_ctx_seq: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    kv_unified: bool | None = None
    kv_caches: list[KvCacheSummary] = Field(default_factory=list)
    flash_attn_requested: FlashAttnName | None = None
    # What "auto" resolved to (llama.cpp probes whether the FA op runs on each layer's device).
    flash_attn: bool | None = None
    pipeline_parallel: bool = False
    sched_copies: int | None = None
    graph_splits: int | None = None
    load_mode: str | None = None
    # Seconds per step ("model", "context", "total"), filled by tuner.llamacpp.load.
    timings_s: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)

    @property
    def tolerance_bytes(self) -> int:
        """How far each byte figure may be from the truth."""
        return 0 if self.exact else LOG_ROUNDING_BYTES

    def device_buffers(self) -> dict[str, BufferSizes]:
        """The buffers that are not host RAM (one per device that got anything)."""
        return {name: sizes for name, sizes in self.buffers.items() if not sizes.host}

    def host_buffers(self) -> dict[str, BufferSizes]:
        return {name: sizes for name, sizes in self.buffers.items() if sizes.host}

    def layers_per_device(self) -> dict[str, int]:
        """Count of layers (output layer included) per ggml device name, from the DEBUG lines."""
        counts: dict[str, int] = {}
        for device in self.layer_devices.values():
            counts[device] = counts.get(device, 0) + 1
        return counts

    def buffer(self, name: str) -> BufferSizes:
        """The sizes of one buffer; a buffer llama.cpp never printed has all zeros."""
        return self.buffers.get(name, BufferSizes(host=is_host_buffer_name(name)))


_FLOAT = r"(\d+(?:\.\d+)?)"
_BUFFER_RE = re.compile(
    r"^(?P<func>~?\w+):\s+(?P<name>\S+)\s+(?P<kind>model|KV|RS|compute|output)"
    r" buffer size =\s*" + _FLOAT + r" MiB\s*$"
)
_LAYER_RE = re.compile(r"^load_tensors: layer\s+(\d+) assigned to device (\S+), is_swa = (\d)")
_OFFLOADED_RE = re.compile(r"^load_tensors: offloaded (\d+)/(\d+) layers to GPU")
_USING_DEVICE_RE = re.compile(r"^llama_prepare_model_devices: using device (\S+) \((.*)\) \((.*)\) - (\d+) MiB free")
_CPARAM_RE = re.compile(r"^llama_context: (n_seq_max|n_ctx|n_ctx_seq|n_batch|n_ubatch|flash_attn|kv_unified)\s+= (\S+)")
_KV_SIZE_RE = re.compile(
    r"^llama_kv_cache: size =\s*" + _FLOAT + r" MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\),"
    r" K \((\w+)\):\s*" + _FLOAT + r" MiB, V \((\w+)\):\s*" + _FLOAT + r" MiB"
)
_SCHED_COPIES_RE = re.compile(r"^sched_reserve: reserve took .* sched copies = (\d+)")
_SPLITS_RE = re.compile(r"^sched_reserve: graph.*: nodes = [^,]+, splits = (\d+)")
_LOAD_MODE_RE = re.compile(r"^load_tensors: loading model tensors.*\(load_mode = (\w+)\)")
_KIND = {
    "model": "model_bytes",
    "KV": "kv_bytes",
    "RS": "kv_bytes",
    "compute": "compute_bytes",
    "output": "output_bytes",
}


def mib_to_bytes(mib: float) -> int:
    return round(mib * MiB)


def parse_log(lines: list[tuple[int, str]]) -> BufferReport:
    """Read a BufferReport from (level, line) pairs of ONE model load and context creation."""
    report = BufferReport()
    sums: dict[str, dict[str, int]] = {}
    compute: dict[str, int] = {}

    def add(name: str, field: str, value: int) -> None:
        sums.setdefault(name, {}).setdefault(field, 0)
        sums[name][field] += value

    for level, line in lines:
        if level == GGML_LOG_LEVEL_ERROR:
            report.errors.append(line)
        elif level == GGML_LOG_LEVEL_WARN:
            report.warnings.append(line)

        if match := _BUFFER_RE.match(line):
            func, name, kind, mib = match.group("func", "name", "kind", 4)
            if func.startswith("~"):  # the destructor's "compute buffer size is" recap
                continue
            if kind == "compute":
                # A new reservation replaces the previous one; it does not add to it.
                compute[name] = mib_to_bytes(float(mib))
            else:
                # Several lines per buffer are real: one model buffer per mmapped file, two KV caches
                # (full and sliding-window) on the same device.
                add(name, _KIND[kind], mib_to_bytes(float(mib)))
        elif line.startswith("sched_reserve: reserving"):
            compute = {}
        elif match := _LAYER_RE.match(line):
            il = int(match.group(1))
            report.layer_devices[il] = match.group(2)
            if match.group(3) == "1":
                report.swa_layers.append(il)
        elif match := _OFFLOADED_RE.match(line):
            report.n_layers_offloaded, report.n_layers_offloadable = int(match.group(1)), int(match.group(2))
        elif match := _USING_DEVICE_RE.match(line):
            report.devices.append(
                UsedDevice(name=match.group(1), description=match.group(2), free_bytes=int(match.group(4)) * MiB)
            )
        elif match := _CPARAM_RE.match(line):
            _set_cparam(report, match.group(1), match.group(2))
        elif match := _KV_SIZE_RE.match(line):
            report.kv_caches.append(
                KvCacheSummary(
                    cells=int(match.group(2)),
                    layers=int(match.group(3)),
                    seqs=int(match.group(5)),
                    type_k=match.group(6),
                    type_v=match.group(8),
                    bytes=mib_to_bytes(float(match.group(1))),
                )
            )
        elif line.startswith("llama_context: pipeline parallelism enabled"):
            report.pipeline_parallel = True
        elif "retrying without pipeline parallelism" in line:
            report.pipeline_parallel = False
        elif match := _SCHED_COPIES_RE.match(line):
            report.sched_copies = int(match.group(1))
        elif match := _SPLITS_RE.match(line):
            report.graph_splits = int(match.group(1))
        elif match := _LOAD_MODE_RE.match(line):
            report.load_mode = match.group(1)
        elif "enabling flash_attn since it is required" in line or line.startswith(
            "resolve_fused_ops: Flash Attention enabled"
        ):
            report.flash_attn = True
        elif line.startswith("resolve_fused_ops: Flash Attention not supported"):
            report.flash_attn = False

    for name, mib_bytes in compute.items():
        add(name, "compute_bytes", mib_bytes)
    report.buffers = {name: BufferSizes(host=is_host_buffer_name(name), **fields) for name, fields in sums.items()}
    if report.flash_attn is None and report.flash_attn_requested in ("enabled", "disabled"):
        report.flash_attn = report.flash_attn_requested == "enabled"
    return report


def _set_cparam(report: BufferReport, key: str, value: str) -> None:
    if key == "flash_attn":
        names: dict[str, FlashAttnName] = {"auto": "auto", "enabled": "enabled", "disabled": "disabled"}
        if value in names:
            report.flash_attn_requested = names[value]
    elif key == "kv_unified":
        report.kv_unified = value == "true"
    else:
        setattr(report, key, int(value))


class LogCapture:
    """Collects llama.cpp's log while active. ``lines`` holds (ggml_log_level, text) per complete line."""

    def __init__(self, echo: bool = False, sink: TextIO | None = None) -> None:
        self.lines: list[tuple[int, str]] = []
        self._echo = echo
        self._sink = sink
        self._partial = ""
        self._partial_level = GGML_LOG_LEVEL_INFO
        self._lock = threading.Lock()
        self._previous: tuple[Any, Any] | None = None
        self._callback: Any = None  # the ctypes thunk; must stay referenced while llama.cpp may call it

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 12, min_level: int = GGML_LOG_LEVEL_INFO) -> list[str]:
        """The last n lines at INFO, WARN or ERROR level (DEBUG lines drown the cause of a failure)."""
        self._flush()
        keep = [line for level, line in self.lines if level >= min_level]
        return keep[-n:]

    def report(self) -> BufferReport:
        self._flush()
        return parse_log(self.lines)

    def _on_log(self, level: int, text: bytes | None, _user_data: Any) -> None:
        # Runs on whichever thread logs (the RPC dispatcher thread too); never let an exception escape
        # into C.
        try:
            chunk = (text or b"").decode("utf-8", errors="replace")
            with self._lock:
                if level != GGML_LOG_LEVEL_CONT:
                    self._partial_level = level
                data = self._partial + chunk
                *complete, self._partial = data.split("\n")
                self.lines.extend((self._partial_level, line) for line in complete)
                if self._sink is not None and complete:
                    self._sink.write("".join(f"{self._partial_level}\t{line}\n" for line in complete))
                    self._sink.flush()
            if self._echo and self._previous is not None and self._previous[0]:
                self._previous[0](level, text, self._previous[1])
        except Exception:
            pass  # a logging callback must not raise into llama.cpp

    def _flush(self) -> None:
        with self._lock:
            if self._partial:
                self.lines.append((self._partial_level, self._partial))
                self._partial = ""

    def start(self) -> None:
        from tuner.llamacpp.libs import llama_cpp_module

        llama_cpp = llama_cpp_module()
        previous_cb = llama_cpp.llama_log_callback()
        previous_ud = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous_cb), ctypes.byref(previous_ud))
        self._previous = (previous_cb, previous_ud)
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, None)

    def stop(self) -> None:
        from tuner.llamacpp.libs import llama_cpp_module

        llama_cpp = llama_cpp_module()
        self._flush()
        if self._previous is not None:
            previous_cb, previous_ud = self._previous
            # A NULL callback would make llama.cpp print everything to stderr; llama_cpp's own callback
            # (verbose-aware) is the quiet default.
            if not previous_cb:
                previous_cb = llama_cpp_module()._logger.llama_log_callback
            llama_cpp.llama_log_set(previous_cb, previous_ud)
        # Keep self._callback referenced: another thread may still be inside it.


@contextlib.contextmanager
def capture_llama_log(echo: bool = False, sink: TextIO | None = None) -> Iterator[LogCapture]:
    """Route llama.cpp's (and ggml's) log into a LogCapture; the previous logger comes back afterwards.

    The logger is process-global: captures must not overlap (one model load at a time).
    ``echo=True`` also passes every message on to the previous logger; ``sink`` receives every complete
    line as ``"<level>\\t<text>\\n"`` as soon as it is logged (survives a crash of the process).
    """
    capture = LogCapture(echo=echo, sink=sink)
    capture.start()
    try:
        yield capture
    finally:
        capture.stop()
