"""NVIDIA inventory through NVML: a fake `pynvml` replays recorded answers of an RTX 4090 + RTX 4080 box.

The fake keeps nvidia-ml-py's real exception classes and constants, so error mapping is tested against
the library's own hierarchy; one test runs the real library on this driver-less machine.
"""

from __future__ import annotations

import ctypes
import json
import logging
import random
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pynvml as real_pynvml
import pytest

from tuner.errors import InventoryError
from tuner.inventory import query_nvidia_devices

FIXTURE = Path(__file__).parent / "fixtures" / "inventory" / "nvml_rtx4090_rtx4080.json"
RECORDED = json.loads(FIXTURE.read_text())["gpus"]
UUID_4090 = RECORDED[0]["nvmlDeviceGetUUID"]
UUID_4080 = RECORDED[1]["nvmlDeviceGetUUID"]


class FakeNvml:
    """Builds a module that answers like pynvml from `gpus` (recorded dicts, in NVML index order)."""

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus
        self.init_error: int | None = None  # an NVML_ERROR_* code nvmlInit raises
        self.has_memory_v2 = True
        self.unsupported: set[str] = set()  # calls that raise NVMLError_NotSupported
        self.lost_index: int | None = None  # a GPU whose name query raises NVMLError_GpuIsLost
        self.shutdowns = 0

    def module(self) -> ModuleType:
        fake = ModuleType("pynvml")
        for attr in dir(real_pynvml):
            if attr.startswith(("NVMLError", "NVML_", "nvmlMemory_v2")):
                setattr(fake, attr, getattr(real_pynvml, attr))
        fake.nvmlInit = self._init
        fake.nvmlShutdown = self._shutdown
        fake.nvmlDeviceGetCount = lambda: len(self.gpus)
        fake.nvmlDeviceGetHandleByIndex = self._handle
        fake.nvmlDeviceGetName = lambda h: self._answer(h, "nvmlDeviceGetName")
        fake.nvmlDeviceGetUUID = lambda h: self._answer(h, "nvmlDeviceGetUUID")
        # A ctypes char array field: bytes, as nvidia-ml-py hands it back.
        fake.nvmlDeviceGetPciInfo = lambda h: SimpleNamespace(
            busId=self._answer(h, "nvmlDeviceGetPciInfo.busId").encode()
        )
        fake.nvmlDeviceGetMemoryInfo = self._memory
        fake.nvmlDeviceGetMemoryBusWidth = lambda h: self._answer(h, "nvmlDeviceGetMemoryBusWidth")
        fake.nvmlDeviceGetMaxClockInfo = self._max_clock
        return fake

    def _init(self) -> None:
        if self.init_error is not None:
            raise real_pynvml.NVMLError(self.init_error)

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def _handle(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _answer(self, handle: int, call: str) -> Any:
        if call in self.unsupported:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_NOT_SUPPORTED)
        if call == "nvmlDeviceGetName" and handle == self.lost_index:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[handle][call]

    def _memory(self, handle: int, version: int | None = None) -> SimpleNamespace:
        if version is None:
            return SimpleNamespace(**self._answer(handle, "nvmlDeviceGetMemoryInfo"))
        if not self.has_memory_v2 or version != real_pynvml.nvmlMemory_v2:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(**self._answer(handle, "nvmlDeviceGetMemoryInfo_v2"))

    def _max_clock(self, handle: int, clock_type: int) -> int:
        assert clock_type == real_pynvml.NVML_CLOCK_MEM, "bandwidth needs the memory clock"
        return self._answer(handle, "nvmlDeviceGetMaxClockInfo(NVML_CLOCK_MEM)")


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(list(RECORDED))
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def test_reads_name_uuid_bus_id_memory_and_bandwidth_of_each_gpu(nvml: FakeNvml) -> None:
    rtx4090, rtx4080 = query_nvidia_devices(env={})

    v2 = RECORDED[0]["nvmlDeviceGetMemoryInfo_v2"]
    assert rtx4090.name == "NVIDIA GeForce RTX 4090"
    assert (rtx4090.kind, rtx4090.backend) == ("cuda", "cuda")
    assert rtx4090.uuid == UUID_4090
    assert rtx4090.pci_bus_id == "0000:01:00.0"
    assert rtx4090.total_bytes == v2["total"] - v2["reserved"]
    assert rtx4090.free_bytes == v2["free"]
    # 384-bit bus at 10501 MHz, two transfers per clock: the datasheet's 1008 GB/s.
    assert rtx4090.bandwidth_bytes_per_s == pytest.approx(1008.1e9, rel=1e-4)

    assert rtx4080.name == "NVIDIA GeForce RTX 4080"
    assert rtx4080.pci_bus_id == "0000:0b:00.0"
    assert rtx4080.free_bytes == RECORDED[1]["nvmlDeviceGetMemoryInfo_v2"]["free"]
    assert rtx4080.bandwidth_bytes_per_s == pytest.approx(716.9e9, rel=1e-4)
    assert nvml.shutdowns == 1


def test_total_leaves_out_driver_reserved_memory_as_cuda_does(nvml: FakeNvml) -> None:
    rtx4090 = query_nvidia_devices(env={})[0]
    # CUDA reports 24207 MiB total for a 24564 MiB card; the difference is NVML v2's `reserved`.
    assert rtx4090.total_bytes // 2**20 == 24564 - 357


def test_falls_back_to_memory_info_v1_when_the_driver_lacks_v2(nvml: FakeNvml) -> None:
    nvml.has_memory_v2 = False
    rtx4090, rtx4080 = query_nvidia_devices(env={})
    assert rtx4090.total_bytes == RECORDED[0]["nvmlDeviceGetMemoryInfo"]["total"]
    assert rtx4090.free_bytes == RECORDED[0]["nvmlDeviceGetMemoryInfo"]["free"]
    assert rtx4080.total_bytes == 16376 * 2**20


def test_bandwidth_comes_from_the_catalog_when_nvml_cannot_report_the_bus(nvml: FakeNvml) -> None:
    nvml.unsupported = {"nvmlDeviceGetMemoryBusWidth"}
    rtx4090, rtx4080 = query_nvidia_devices(env={})
    assert rtx4090.bandwidth_bytes_per_s == pytest.approx(1008e9)
    assert rtx4080.bandwidth_bytes_per_s == pytest.approx(716.8e9)


def test_orders_gpus_by_pci_bus_id_whatever_nvml_index_order(nvml: FakeNvml) -> None:
    nvml.gpus = list(reversed(RECORDED))
    assert [d.uuid for d in query_nvidia_devices(env={})] == [UUID_4090, UUID_4080]


def test_orders_by_pci_domain_then_bus_with_hex_bus_numbers(nvml: FakeNvml) -> None:
    buses = ["00000000:0A:00.0", "00000000:01:00.0", "00000001:02:00.0", "00000000:41:00.0", "00000000:09:00.0"]
    gpus = []
    for bus in buses:
        gpus.append(dict(RECORDED[0], **{"nvmlDeviceGetPciInfo.busId": bus}))
    random.Random(7).shuffle(gpus)
    nvml.gpus = gpus
    found = [d.pci_bus_id for d in query_nvidia_devices(env={})]
    assert found == ["0000:01:00.0", "0000:09:00.0", "0000:0a:00.0", "0000:41:00.0", "0001:02:00.0"]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        pytest.param(None, [UUID_4090, UUID_4080], id="unset-all"),
        pytest.param("", [], id="empty-none"),
        pytest.param("1", [UUID_4080], id="second-only"),
        pytest.param("1,0", [UUID_4080, UUID_4090], id="reordered"),
        pytest.param(" 0 , 1 ", [UUID_4090, UUID_4080], id="spaces"),
        pytest.param("0,7,1", [UUID_4090], id="out-of-range-truncates"),
        pytest.param("0,x,1", [UUID_4090], id="garbage-truncates"),
        pytest.param("-1", [], id="negative-hides-all"),
        pytest.param("0,1,0", [], id="repeat-hides-all"),
        pytest.param(UUID_4080, [UUID_4080], id="full-uuid"),
        pytest.param("GPU-5f20,GPU-5d1c", [UUID_4080, UUID_4090], id="uuid-prefixes"),
        pytest.param("GPU-5", [], id="ambiguous-prefix"),
        pytest.param("GPU-5d1c,1", [UUID_4090], id="ordinal-after-uuid-truncates"),
        pytest.param("GPU-ffff", [], id="unknown-uuid"),
        pytest.param("MIG-4a3b2c1d-0000-1111-2222-333344445555", [], id="mig-unsupported"),
    ],
)
def test_cuda_visible_devices_selects_and_reorders_like_cuda(
    nvml: FakeNvml, visible: str | None, expected: list[str]
) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert [d.uuid for d in query_nvidia_devices(env=env)] == expected


def test_reads_cuda_visible_devices_from_the_process_environment(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.name for d in query_nvidia_devices()] == ["NVIDIA GeForce RTX 4080"]


@pytest.mark.parametrize(
    ("error", "level"),
    [
        pytest.param(real_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, logging.DEBUG, id="no-library"),
        pytest.param(real_pynvml.NVML_ERROR_DRIVER_NOT_LOADED, logging.DEBUG, id="no-driver"),
        pytest.param(real_pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, logging.WARNING, id="driver-mismatch"),
        pytest.param(real_pynvml.NVML_ERROR_NO_PERMISSION, logging.WARNING, id="no-permission"),
    ],
)
def test_nvml_that_cannot_start_gives_no_devices_and_logs(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture, error: int, level: int
) -> None:
    nvml.init_error = error
    with caplog.at_level(logging.DEBUG, logger="tuner.inventory.nvidia"):
        assert query_nvidia_devices(env={}) == []
    assert [record.levelno for record in caplog.records] == [level]
    assert str(real_pynvml.NVMLError(error)) in caplog.text


def test_missing_pynvml_package_gives_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert query_nvidia_devices(env={}) == []


def test_real_nvml_on_a_machine_without_driver_gives_no_devices() -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this machine has the NVIDIA driver library")
    assert query_nvidia_devices(env={}) == []


def test_a_gpu_nvml_cannot_describe_is_an_inventory_error_naming_it(nvml: FakeNvml) -> None:
    nvml.lost_index = 1
    with pytest.raises(InventoryError, match=r"NVIDIA GPU 1: GPU is lost; check that `nvidia-smi` lists it"):
        query_nvidia_devices(env={})
    assert nvml.shutdowns == 1


def test_fastest_first_device_order_is_refused() -> None:
    from tuner.errors import InventoryError
    from tuner.inventory import query_nvidia_devices

    with pytest.raises(InventoryError, match="CUDA_DEVICE_ORDER=FASTEST_FIRST"):
        query_nvidia_devices(env={"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
