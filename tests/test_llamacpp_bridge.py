"""The bridge to llama.cpp: RPC inventory, per-buffer reports of real loads, the dry run, the log capture.

Everything runs real llama.cpp on local RPC servers (tests/kit/rpcbed.py) with SmolLM2-135M. The expected
sizes are the ones llama.cpp printed on this kind of machine (/work/shared/notes/llama-cpp-facts.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.models import TestModelMissing, smollm2_path
from tests.kit.rpcbed import rpc_servers
from tuner import LoadSettings
from tuner.errors import GGUFError, InventoryError, PlanRequestError
from tuner.llamacpp import (
    GGML_TYPE_IDS,
    LOG_ROUNDING_BYTES,
    BufferReport,
    LoadError,
    apply_memory_breakdown,
    capture_llama_log,
    load_and_report,
    memory_breakdown_rows,
    parse_log,
    probe_rpc_endpoint,
    query_rpc_devices,
)

pytestmark = pytest.mark.llama

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[1]
SPLIT = dict(n_gpu_layers=99, tensor_split=(0.6, 0.4), n_ctx=2048)


def settings(**values: Any) -> LoadSettings:
    return LoadSettings(**values)


def mib(value: float) -> int:
    return round(value * MiB)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return smollm2_path()
    except TestModelMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def two_devices() -> Iterator[list[str]]:
    with rpc_servers(2) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def split_load(smollm2: Path, two_devices: list[str]) -> BufferReport:
    return load_and_report(smollm2, settings(**SPLIT), rpc_endpoints=two_devices)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- RPC inventory ------------------------------------------------------------------------------------


def test_query_rpc_devices_lists_one_cpu_device_per_server(two_devices: list[str]) -> None:
    devices = query_rpc_devices(two_devices)

    assert [d.name for d in devices] == [f"RPC0[{endpoint}]" for endpoint in two_devices]
    assert [d.endpoint for d in devices] == two_devices
    assert {(d.kind, d.backend) for d in devices} == {("rpc", "cpu")}
    # ggml's CPU device reports all physical RAM, and all of it as free.
    physical_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert all(d.total_bytes == physical_bytes and d.free_bytes == physical_bytes for d in devices)


def test_query_rpc_devices_takes_the_backend_the_caller_names(two_devices: list[str]) -> None:
    devices = query_rpc_devices(two_devices[:1], backend="rocm")

    assert [d.backend for d in devices] == ["rocm"]


def test_unreachable_endpoint_raises_inventory_error_at_once() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()

    with pytest.raises(InventoryError, match=f"{endpoint} is unreachable"):
        query_rpc_devices([endpoint])

    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("endpoint", ["localhost", "host:", ":50052", "host:port", "host:70000"])
def test_malformed_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(InventoryError, match="is not host:port"):
        query_rpc_devices([endpoint])


def test_busy_rpc_server_times_out_instead_of_hanging(two_devices: list[str]) -> None:
    host, port = two_devices[0].split(":")
    # Hold the server: it serves one client at a time, so a second handshake waits.
    with socket.create_connection((host, int(port)), timeout=5) as holder:
        holder.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        holder.recv(8 + 28)
        started = time.monotonic()
        with pytest.raises(InventoryError, match="one client at a time"):
            probe_rpc_endpoint(two_devices[0], timeout_s=0.5)
        assert time.monotonic() - started < 2.0
    assert probe_rpc_endpoint(two_devices[0]) == 1  # free again once the first client left


def test_listener_that_is_not_an_rpc_server_is_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_like_http() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_like_http, daemon=True)
    thread.start()
    with listener, pytest.raises(InventoryError, match=r"not a llama\.cpp RPC server"):
        probe_rpc_endpoint(f"127.0.0.1:{port}", timeout_s=2.0)
    thread.join(timeout=5)


# --- real loads on two RPC devices --------------------------------------------------------------------


def test_split_load_reproduces_llama_cpp_buffer_sizes(split_load: BufferReport, two_devices: list[str]) -> None:
    first, second = (f"RPC0[{endpoint}]" for endpoint in two_devices)
    buffers = split_load.buffers
    tolerance = LOG_ROUNDING_BYTES

    assert abs(buffers[first].model_bytes - mib(40.16)) <= tolerance
    assert abs(buffers[second].model_bytes - mib(51.94)) <= tolerance
    assert abs(buffers[first].kv_bytes - mib(28.50)) <= tolerance
    assert abs(buffers[second].kv_bytes - mib(16.50)) <= tolerance
    assert abs(buffers["CPU_Mapped"].model_bytes - mib(28.69)) <= tolerance  # token_embd stays on the host
    assert set(split_load.device_buffers()) == {first, second}
    assert split_load.layers_per_device() == {"RPC0": 19, "RPC1": 12}  # 30 blocks + the output layer
    assert split_load.device_buffer_names == {"RPC0": first, "RPC1": second}
    assert split_load.n_ctx == split_load.n_ctx_seq == 2048


def test_exact_breakdown_agrees_with_the_logged_sizes(split_load: BufferReport) -> None:
    assert split_load.exact
    assert split_load.logged_buffers.keys() == split_load.buffers.keys()
    for name, logged in split_load.logged_buffers.items():
        exact = split_load.buffers[name]
        for field in ("model_bytes", "kv_bytes", "compute_bytes"):
            assert abs(getattr(exact, field) - getattr(logged, field)) <= LOG_ROUNDING_BYTES, (name, field)
    # The KV cache is whole MiB here, so the exact figure is exactly the logged one.
    assert sum(b.kv_bytes for b in split_load.buffers.values()) == split_load.kv_caches[0].bytes == mib(45)


def test_full_offload_to_rpc_devices_turns_on_pipeline_parallelism(split_load: BufferReport) -> None:
    assert split_load.pipeline_parallel
    assert split_load.sched_copies == 4
    assert split_load.flash_attn_requested == "auto"
    assert split_load.flash_attn is True  # the FA op runs on the RPC (CPU) devices


def test_partial_offload_keeps_first_layer_on_cpu_without_pipeline_parallelism(
    smollm2: Path, two_devices: list[str]
) -> None:
    report = load_and_report(
        smollm2, settings(n_gpu_layers=30, tensor_split=(0.6, 0.4), n_ctx=2048), rpc_endpoints=two_devices
    )

    assert not report.pipeline_parallel
    assert report.layer_devices[0] == "CPU"
    assert report.n_layers_offloaded == 30
    assert report.layers_per_device() == {"CPU": 1, "RPC0": 18, "RPC1": 12}
    assert report.buffer("CPU").kv_bytes == mib(45) // 30  # the KV cache of a layer lives with it


def test_dry_run_predicts_the_real_load_without_allocating(
    smollm2: Path, two_devices: list[str], split_load: BufferReport
) -> None:
    dry = load_and_report(smollm2, settings(**SPLIT), rpc_endpoints=two_devices, dry_run=True)

    assert dry.exact and dry.load_mode == "none"
    # The log shows the placeholder buffers: nothing was allocated.
    assert all(b.model_bytes == 0 and b.kv_bytes == 0 for b in dry.logged_buffers.values())
    for name, real in split_load.device_buffers().items():
        predicted = dry.buffers[name]
        assert (predicted.model_bytes, predicted.kv_bytes) == (real.model_bytes, real.kv_bytes), name
        # The dry run reserves the graph once more per copy: never less than the real compute buffer,
        # at most sched_copies x n_ubatch x n_embd x 4 bytes (4 x 512 x 576 x 4 = 4.5 MiB) more.
        assert real.compute_bytes <= predicted.compute_bytes <= real.compute_bytes + 4 * 512 * 576 * 4, name
    # Without mmap the host weights sit in a plain CPU buffer instead of CPU_Mapped.
    assert dry.buffers["CPU"].model_bytes == split_load.buffers["CPU_Mapped"].model_bytes


# --- failures ----------------------------------------------------------------------------------------


def test_file_that_is_not_gguf_raises_load_error_with_llama_cpp_log(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 100)

    with pytest.raises(LoadError, match="could not load") as info:
        load_and_report(bogus, settings(n_gpu_layers=0, n_ctx=512))

    assert any("magic" in line or "failed to load" in line for line in info.value.log_tail)


def test_missing_model_file_raises_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="does not exist"):
        load_and_report(tmp_path / "absent.gguf", settings(n_ctx=512))


def test_quantised_v_cache_without_flash_attention_is_refused(smollm2: Path) -> None:
    with pytest.raises(PlanRequestError, match="needs flash attention"):
        load_and_report(smollm2, settings(type_v="q8_0", flash_attn="off", n_ctx=512))


def test_unknown_cache_type_is_refused(smollm2: Path) -> None:
    with pytest.raises(PlanRequestError, match="q3_K"):
        load_and_report(smollm2, settings(type_k="q3_K", n_ctx=512))


def test_load_that_outlives_its_timeout_raises_load_error(smollm2: Path) -> None:
    with pytest.raises(LoadError, match="longer than"):
        load_and_report(smollm2, settings(n_gpu_layers=0, n_ctx=512), timeout_s=0.05)


def test_quantised_kv_cache_shrinks_kv_buffers(smollm2: Path, two_devices: list[str], split_load: BufferReport) -> None:
    report = load_and_report(
        smollm2, settings(type_k="q8_0", type_v="q8_0", flash_attn="on", **SPLIT), rpc_endpoints=two_devices
    )

    for name, f16 in split_load.device_buffers().items():
        # q8_0 stores 32 values in 34 bytes, f16 in 64.
        assert report.buffers[name].kv_bytes == f16.kv_bytes * 34 // 64, name
    assert report.kv_caches[0].type_k == report.kv_caches[0].type_v == "q8_0"


# --- ggml names and the log capture ------------------------------------------------------------------


def test_ggml_type_ids_match_the_library() -> None:
    from tuner.llamacpp import libs

    base = libs.ggml_base()
    assert {name: base.ggml_type_name(type_id).decode() for name, type_id in GGML_TYPE_IDS.items()} == {
        name: name for name in GGML_TYPE_IDS
    }


def test_log_capture_reads_a_cpu_only_llama_load_and_restores_the_logger(smollm2: Path) -> None:
    import llama_cpp

    def current_logger() -> tuple[int, int | None]:
        callback, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
        return ctypes.cast(callback, ctypes.c_void_p).value or 0, user_data.value

    before = current_logger()
    with capture_llama_log() as capture:
        llm = llama_cpp.Llama(str(smollm2), n_ctx=512, n_gpu_layers=0, n_threads=1, verbose=False)
    assert current_logger() == before

    report = capture.report()
    assert not report.exact
    apply_memory_breakdown(report, memory_breakdown_rows(llm._ctx.ctx))
    llm.close()
    assert report.exact
    # 30 layers x 2 (K and V) x 192 values x 2 bytes x 512 cells
    assert report.buffers["CPU"].kv_bytes == report.logged_buffers["CPU"].kv_bytes == mib(11.25)
    # the whole file is mapped; the weights the CPU backend repacks get an extra buffer (AMX / CPU_REPACK)
    assert abs(report.buffers["CPU_Mapped"].model_bytes - mib(92.10)) <= LOG_ROUNDING_BYTES
    assert report.buffers["CPU"].compute_bytes > 0 and report.buffers["CPU"].output_bytes > 0
    assert report.device_buffers() == {}
    assert (report.n_ctx, report.n_ctx_seq, report.n_seq_max) == (512, 512, 1)
    assert report.flash_attn_requested == "disabled" and report.flash_attn is False  # Llama's default
    assert not report.pipeline_parallel
    assert report.layers_per_device() == {"CPU": 31}
    assert capture.tail(3) and all("\n" not in line for _, line in capture.lines)


def test_parse_log_takes_the_last_compute_reservation_and_sums_kv_caches() -> None:
    info = 2
    lines = [
        (info, "llama_kv_cache: CUDA0 KV buffer size =    10.00 MiB"),
        (info, "llama_kv_cache: CUDA0 KV buffer size =     2.50 MiB"),  # the sliding-window cache
        (info, "sched_reserve: reserving ..."),
        (info, "sched_reserve:      CUDA0 compute buffer size =   300.00 MiB"),
        (info, "sched_reserve: reserving ..."),
        (info, "sched_reserve:      CUDA0 compute buffer size =   250.25 MiB"),
        (info, "~llama_context:      CUDA0 compute buffer size is 250.2500 MiB, matches expectation"),
        (info, "load_tensors:    CUDA_Host model buffer size =     1.00 MiB"),
    ]

    report = parse_log(lines)

    assert report.buffers["CUDA0"].kv_bytes == mib(12.5)
    assert report.buffers["CUDA0"].compute_bytes == mib(250.25)
    assert report.buffers["CUDA_Host"].host and not report.buffers["CUDA0"].host
    assert not report.exact and report.tolerance_bytes == LOG_ROUNDING_BYTES


# --- the high-level Llama on RPC devices ----------------------------------------------------------------


def test_registered_rpc_devices_are_used_by_the_high_level_llama(smollm2: Path, two_devices: list[str]) -> None:
    # In a child: registration is process-global, and this pytest process must not keep RPC devices
    # that vanish with the test bed.
    script = textwrap.dedent(
        f"""
        import json, llama_cpp
        from tuner.llamacpp import capture_llama_log, register_rpc_endpoints
        register_rpc_endpoints({two_devices!r})
        register_rpc_endpoints({two_devices!r})  # idempotent
        with capture_llama_log() as capture:
            llm = llama_cpp.Llama({str(smollm2)!r}, n_ctx=2048, n_gpu_layers=99, tensor_split=[0.6, 0.4],
                                  verbose=False)
            llm.close()
        print(capture.report().model_dump_json())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = BufferReport.model_validate(json.loads(proc.stdout.strip().splitlines()[-1]))

    first, second = (f"RPC0[{endpoint}]" for endpoint in two_devices)
    assert [d.name for d in report.devices] == ["RPC0", "RPC1"]
    assert abs(report.buffers[first].model_bytes - mib(40.16)) <= LOG_ROUNDING_BYTES
    assert abs(report.buffers[second].kv_bytes - mib(16.50)) <= LOG_ROUNDING_BYTES


def test_every_public_name_is_exported_and_resolves() -> None:
    import tuner.llamacpp as package

    assert sorted(package.__all__) == sorted(package._MODULE_OF)
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError):
        _ = package.not_a_name


def test_abort_inside_llama_cpp_becomes_load_error_and_spares_the_caller(smollm2: Path) -> None:
    # A fake RPC server that passes the handshake, then hangs up on the first real command: ggml's client
    # calls GGML_ABORT, which kills the child process, not this one.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    while True:
                        header = conn.recv(9)
                        if len(header) < 9:
                            break
                        cmd, size = struct.unpack("<BQ", header)
                        conn.recv(size) if size else b""
                        if cmd == 14:  # HELLO: protocol 7.0.0 and no transport capabilities
                            conn.sendall(struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24))
                        elif cmd == 15:  # DEVICE_COUNT
                            conn.sendall(struct.pack("<QI", 4, 1))
                        else:
                            break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with listener, pytest.raises(LoadError, match="SIGABRT") as info:
        load_and_report(smollm2, settings(n_gpu_layers=99, n_ctx=512), rpc_endpoints=[f"127.0.0.1:{port}"])

    assert any("Remote RPC server crashed" in line for line in info.value.log_tail)
