"""AMD inventory: amdsmi, then rocm-smi, then sysfs, each fed recorded answers of an RX 7900 XTX + RX 7800 XT box.

amdsmi is a fake module; rocm-smi is a small executable in tmp_path printing the recorded JSON; sysfs is
a directory tree in tmp_path. The probe itself runs unchanged, subprocess and file reads included.
"""

from __future__ import annotations

import enum
import json
import logging
import stat
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tuner.errors import InventoryError
from tuner.inventory import amd, query_amd_devices

FIXTURES = Path(__file__).parent / "fixtures" / "inventory"
ROCM_SMI_JSON = (FIXTURES / "rocm_smi_rx7900xtx_rx7800xt.json").read_text()
AMDSMI_RECORDED = json.loads((FIXTURES / "amdsmi_rx7900xtx_rx7800xt.json").read_text())["gpus"]
SYSFS_FILES = json.loads((FIXTURES / "sysfs_rx7900xtx_rx7800xt.json").read_text())["files"]

XTX = "AMD Radeon RX 7900 XTX"
XT7800 = "AMD Radeon RX 7800 XT"
UUID_XTX = "GPU-5a1e3c7b9d2f4068"
UUID_7800 = "GPU-2b77d40e8c1a9f35"
XTX_TOTAL = 25753026560
XTX_USED = 1172836352


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        super().__init__(err_code)
        self.err_code = err_code


class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


class FakeAmdSmi:
    """Builds a module that answers like amdsmi from recorded dicts, in handle order."""

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus
        self.init_error: int | None = None
        self.failing_call: str | None = None
        self.shutdowns = 0

    def module(self) -> ModuleType:
        fake = ModuleType("amdsmi")
        fake.AmdSmiException = AmdSmiException
        fake.AmdSmiLibraryException = AmdSmiLibraryException
        fake.AmdSmiMemoryType = AmdSmiMemoryType
        fake.amdsmi_init = self._init
        fake.amdsmi_shut_down = self._shut_down
        fake.amdsmi_get_processor_handles = lambda: list(range(len(self.gpus)))
        fake.amdsmi_get_gpu_asic_info = lambda h: dict(self._answer(h, "amdsmi_get_gpu_asic_info"))
        fake.amdsmi_get_gpu_device_bdf = lambda h: self._answer(h, "amdsmi_get_gpu_device_bdf")
        fake.amdsmi_get_gpu_memory_total = lambda h, t: self._answer(h, f"amdsmi_get_gpu_memory_total({t.name})")
        fake.amdsmi_get_gpu_memory_usage = lambda h, t: self._answer(h, f"amdsmi_get_gpu_memory_usage({t.name})")
        return fake

    def _init(self) -> None:
        if self.init_error is not None:
            raise AmdSmiLibraryException(self.init_error)

    def _shut_down(self) -> None:
        self.shutdowns += 1

    def _answer(self, handle: int, call: str) -> Any:
        if call == self.failing_call:
            raise AmdSmiLibraryException(2)  # AMDSMI_STATUS_NOT_SUPPORTED
        return self.gpus[handle][call]


@pytest.fixture
def no_amdsmi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # `import amdsmi` raises ImportError


@pytest.fixture
def fake_amdsmi(monkeypatch: pytest.MonkeyPatch) -> FakeAmdSmi:
    fake = FakeAmdSmi(list(AMDSMI_RECORDED))
    monkeypatch.setitem(sys.modules, "amdsmi", fake.module())
    return fake


def write_executable(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def rocm_smi(tmp_path: Path) -> str:
    """A rocm-smi that prints the recorded answer when asked for VRAM as JSON, like the real one."""
    (tmp_path / "answer.json").write_text(ROCM_SMI_JSON)
    return write_executable(
        tmp_path / "rocm-smi",
        "args = sys.argv[1:]\n"
        "if '--json' not in args or args[args.index('--showmeminfo') + 1] != 'vram':\n"
        "    sys.exit('unexpected arguments: ' + ' '.join(args))\n"
        f"print(open({str(tmp_path / 'answer.json')!r}).read())",
    )


def write_sysfs(root: Path, files: dict[str, str]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    return write_sysfs(tmp_path / "sys", SYSFS_FILES)


def summary(devices: list[Any]) -> list[tuple[Any, ...]]:
    return [(d.name, d.uuid, d.pci_bus_id, d.total_bytes, d.free_bytes) for d in devices]


EXPECTED = [
    (XTX, UUID_XTX, "0000:03:00.0", XTX_TOTAL, XTX_TOTAL - XTX_USED),
    (XT7800, UUID_7800, "0000:0c:00.0", 17163091968, 17163091968 - 28155904),
]


def test_amdsmi_gives_named_gpus_with_catalog_bandwidth(fake_amdsmi: FakeAmdSmi, tmp_path: Path) -> None:
    devices = query_amd_devices(env={}, rocm_smi=None, sysfs_root=tmp_path)
    assert summary(devices) == EXPECTED
    assert all((d.kind, d.backend) == ("rocm", "rocm") for d in devices)
    assert [d.bandwidth_bytes_per_s for d in devices] == [960e9, 624e9]
    assert fake_amdsmi.shutdowns == 1


def test_amdsmi_handles_are_ordered_by_pci_bus(fake_amdsmi: FakeAmdSmi, tmp_path: Path) -> None:
    fake_amdsmi.gpus = list(reversed(AMDSMI_RECORDED))
    assert [d.name for d in query_amd_devices(env={}, rocm_smi=None, sysfs_root=tmp_path)] == [XTX, XT7800]


def test_amdsmi_failing_on_a_gpu_is_an_inventory_error(fake_amdsmi: FakeAmdSmi, tmp_path: Path) -> None:
    fake_amdsmi.failing_call = "amdsmi_get_gpu_memory_usage(VRAM)"
    with pytest.raises(InventoryError, match="amdsmi failed to describe an AMD GPU"):
        query_amd_devices(env={}, rocm_smi=None, sysfs_root=tmp_path)
    assert fake_amdsmi.shutdowns == 1


def test_amdsmi_that_cannot_start_falls_back_to_rocm_smi(fake_amdsmi: FakeAmdSmi, rocm_smi: str) -> None:
    fake_amdsmi.init_error = 34  # AMDSMI_STATUS_DRV_ERR: amdgpu not loaded
    assert summary(query_amd_devices(env={}, rocm_smi=rocm_smi, sysfs_root="/nonexistent")) == EXPECTED


def test_amdsmi_package_without_its_library_falls_back_to_rocm_smi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rocm_smi: str
) -> None:
    # The real package raises OSError at import when libamd_smi.so is missing.
    package = tmp_path / "site" / "amdsmi"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise OSError('Could not load libamd_smi.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    assert summary(query_amd_devices(env={}, rocm_smi=rocm_smi, sysfs_root="/nonexistent")) == EXPECTED


def test_rocm_smi_names_cards_its_pci_names_leave_vague(no_amdsmi: None, rocm_smi: str) -> None:
    # "Navi 31 [Radeon RX 7900 XT/7900 XTX/...]" and "Navi 32 [Radeon RX 7700 XT / 7800 XT]": device id
    # and VRAM size decide.
    devices = query_amd_devices(env={}, rocm_smi=rocm_smi, sysfs_root="/nonexistent")
    assert summary(devices) == EXPECTED
    assert [d.bandwidth_bytes_per_s for d in devices] == [960e9, 624e9]


def test_rocm_smi_warnings_before_the_json_are_skipped(no_amdsmi: None, tmp_path: Path) -> None:
    (tmp_path / "answer.json").write_text(ROCM_SMI_JSON)
    executable = write_executable(
        tmp_path / "rocm-smi",
        "print('WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status')\n"
        f"print(open({str(tmp_path / 'answer.json')!r}).read())",
    )
    assert summary(query_amd_devices(env={}, rocm_smi=executable, sysfs_root="/nonexistent")) == EXPECTED


@pytest.mark.parametrize(
    ("body", "level"),
    [
        pytest.param("sys.stderr.write('ERROR: No AMD GPUs specified\\n'); sys.exit(2)", logging.DEBUG, id="exit-2"),
        pytest.param("print('{\"card0\": ')", logging.WARNING, id="broken-json"),
        pytest.param("time.sleep(30)", logging.WARNING, id="hangs"),
    ],
)
def test_rocm_smi_failures_fall_back_to_sysfs(
    no_amdsmi: None,
    tmp_path: Path,
    sysfs: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    body: str,
    level: int,
) -> None:
    monkeypatch.setattr(amd, "ROCM_SMI_TIMEOUT_S", 1.0)
    executable = write_executable(tmp_path / "rocm-smi", body)
    with caplog.at_level(logging.DEBUG, logger="tuner.inventory.amd"):
        devices = query_amd_devices(env={}, rocm_smi=executable, sysfs_root=sysfs)
    assert summary(devices) == EXPECTED
    assert any(r.levelno == level and "reading sysfs" in r.getMessage() for r in caplog.records)


def test_missing_rocm_smi_falls_back_to_sysfs(no_amdsmi: None, tmp_path: Path, sysfs: Path) -> None:
    devices = query_amd_devices(env={}, rocm_smi=str(tmp_path / "not-installed"), sysfs_root=sysfs)
    assert summary(devices) == EXPECTED


def test_sysfs_skips_other_vendors_connectors_and_render_nodes(no_amdsmi: None, sysfs: Path) -> None:
    devices = query_amd_devices(env={}, rocm_smi=None, sysfs_root=sysfs)
    assert [d.pci_bus_id for d in devices] == ["0000:03:00.0", "0000:0c:00.0"]
    assert [d.bandwidth_bytes_per_s for d in devices] == [960e9, 624e9]


def test_sysfs_product_name_and_unknown_cards(no_amdsmi: None, tmp_path: Path) -> None:
    root = write_sysfs(
        tmp_path / "sys",
        {
            # One GCD of an MI250 as amdgpu shows it, and a card the catalog does not know.
            "class/drm/card1/device/vendor": "0x1002\n",
            "class/drm/card1/device/device": "0x740c\n",
            "class/drm/card1/device/uevent": "DRIVER=amdgpu\nPCI_SLOT_NAME=0000:c1:00.0\n",
            "class/drm/card1/device/product_name": "AMD INSTINCT MI250 (MCM) OAM AC MBA\n",
            "class/drm/card1/device/mem_info_vram_total": "68702699520\n",
            "class/drm/card1/device/mem_info_vram_used": "10960896\n",
            "class/drm/card2/device/vendor": "0x1002\n",
            "class/drm/card2/device/device": "0x1681\n",
            "class/drm/card2/device/uevent": "DRIVER=amdgpu\nPCI_SLOT_NAME=0000:e5:00.0\n",
            "class/drm/card2/device/mem_info_vram_total": "536870912\n",
            "class/drm/card2/device/mem_info_vram_used": "107847680\n",
        },
    )
    mi250, unknown = query_amd_devices(env={}, rocm_smi=None, sysfs_root=root)
    assert (mi250.name, mi250.bandwidth_bytes_per_s, mi250.uuid) == ("AMD Instinct MI250", 1638.4e9, None)
    assert (unknown.name, unknown.bandwidth_bytes_per_s) == ("AMD GPU 0x1681", None)
    assert unknown.free_bytes == 536870912 - 107847680


def test_no_amd_gpu_anywhere_gives_no_devices(no_amdsmi: None, tmp_path: Path) -> None:
    assert query_amd_devices(env={}, rocm_smi=str(tmp_path / "not-installed"), sysfs_root=tmp_path) == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"HIP_VISIBLE_DEVICES": "1"}, [XT7800], id="hip"),
        pytest.param({"CUDA_VISIBLE_DEVICES": "1,0"}, [XT7800, XTX], id="cuda-honoured-by-hip"),
        pytest.param({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "1"}, [XTX], id="hip-wins-over-cuda"),
        pytest.param({"ROCR_VISIBLE_DEVICES": "1"}, [XT7800], id="rocr"),
        pytest.param({"ROCR_VISIBLE_DEVICES": UUID_7800}, [XT7800], id="rocr-uuid"),
        pytest.param({"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0"}, [XT7800], id="hip-counts-after-rocr"),
        pytest.param({"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "1"}, [], id="hip-out-of-rocr-range"),
        pytest.param({"HIP_VISIBLE_DEVICES": ""}, [], id="empty-hides-all"),
    ],
)
def test_visible_devices_variables_select_amd_gpus(
    no_amdsmi: None, rocm_smi: str, env: dict[str, str], expected: list[str]
) -> None:
    devices = query_amd_devices(env=env, rocm_smi=rocm_smi, sysfs_root="/nonexistent")
    assert [d.name for d in devices] == expected
