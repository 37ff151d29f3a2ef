"""Simulated inventories (`--gpus`), the GPU catalog, and discover_devices' choice and order of sources."""

from __future__ import annotations

import json
import stat
import sys
from collections import Counter
from pathlib import Path

import pytest

import tuner.inventory
from tuner.errors import InventoryError
from tuner.inventory import discover_devices, lookup_gpu, parse_size, simulated_devices
from tuner.inventory.catalog import canonical_name, find_gpu, load_catalog

GIB = 2**30
FIXTURES = Path(__file__).parent / "fixtures" / "inventory"


# --- catalog ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["4090", "rtx4090", "RTX 4090", "GeForce RTX 4090", "NVIDIA GeForce RTX 4090",
                                  "nvidia geforce rtx-4090", "rtx_4090"])  # fmt: skip
def test_catalog_matches_every_usual_spelling_of_a_card(name: str) -> None:
    spec = lookup_gpu(name)
    assert (spec.name, spec.vram_mib, spec.bandwidth_gb_s, spec.backend) == (
        "NVIDIA GeForce RTX 4090", 24564, 1008, "cuda"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("RX 7900 XTX", "AMD Radeon RX 7900 XTX"),
        ("7900xt", "AMD Radeon RX 7900 XT"),
        ("A6000", "NVIDIA RTX A6000"),
        ("RTX 6000 Ada", "NVIDIA RTX 6000 Ada Generation"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"),
        ("H100 SXM", "NVIDIA H100 80GB HBM3"),
        ("mi300x", "AMD Instinct MI300X"),
        ("Radeon Pro W7900", "AMD Radeon PRO W7900"),
        ("T4", "Tesla T4"),
        ("4080 super", "NVIDIA GeForce RTX 4080 SUPER"),
    ],
)
def test_catalog_finds_datacenter_workstation_and_amd_cards(name: str, expected: str) -> None:
    assert lookup_gpu(name).name == expected


def test_every_catalog_spelling_points_to_one_card() -> None:
    owners: Counter[str] = Counter()
    for spec in load_catalog():
        for key in {canonical_name(spelling) for spelling in (spec.name, *spec.aliases)}:
            owners[key] += 1
    assert [key for key, count in owners.items() if count > 1] == []
    assert all(lookup_gpu(spec.name) == spec for spec in load_catalog())


def test_catalog_bandwidth_agrees_with_nvml_bus_width_and_clock() -> None:
    # H100 SXM numbers measured with NVML (shared H100 run): 5120-bit bus, 2619 MHz max memory clock.
    assert lookup_gpu("H100 SXM").bandwidth_bytes_per_s == pytest.approx(5120 / 8 * 2619e6 * 2, rel=1e-3)
    assert lookup_gpu("H100 SXM").vram_mib == 81559


@pytest.mark.parametrize(
    ("name", "choices"),
    [
        ("H100", "H100 SXM, H100 PCIe, H100 NVL"),
        ("RX 7900", "RX 7900 XTX, RX 7900 XT, RX 7900 GRE"),
        ("V100", "V100 32GB, V100 16GB"),
    ],
)
def test_ambiguous_name_lists_the_cards_it_could_be(name: str, choices: str) -> None:
    with pytest.raises(InventoryError, match=f"is ambiguous: it could be {choices}; write one of them in full"):
        lookup_gpu(name)


def test_partial_number_is_not_a_prefix_match() -> None:
    with pytest.raises(InventoryError, match=r"unknown GPU '409'.*did you mean RTX 4090"):
        lookup_gpu("409")


def test_find_gpu_tells_sister_cards_apart_by_vram() -> None:
    navi31 = "Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M]"
    assert find_gpu(navi31, 0x744C, 25753026560).name == "AMD Radeon RX 7900 XTX"
    assert find_gpu(navi31, 0x744C, 20 * GIB).name == "AMD Radeon RX 7900 XT"
    assert find_gpu(None, 0x744C, 16 * GIB).name == "AMD Radeon RX 7900 GRE"
    # RX 6800, 6800 XT and 6900 XT share id and size: no guess.
    assert find_gpu(None, 0x73BF, 16 * GIB) is None


# --- sizes and specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [("24GiB", 24 * GIB), ("16 GB", 16 * 10**9), ("24564MiB", 24564 * 2**20), ("500mb", 500 * 10**6),
     ("1.5TiB", 3 * 2**39), ("23.5 gib", int(23.5 * GIB))],
)  # fmt: skip
def test_parse_size_units(text: str, size_bytes: int) -> None:
    assert parse_size(text) == size_bytes


@pytest.mark.parametrize("text", ["24", "GiB", "24 GiBs", "-2GiB", "24 Gb/s"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(InventoryError, match="is not a memory size; write a number and a unit"):
        parse_size(text)


def test_named_cards_get_catalog_memory_bandwidth_and_backend() -> None:
    rtx4090, rtx4080 = simulated_devices("RTX 4090,RTX 4080")
    assert (rtx4090.name, rtx4090.kind, rtx4090.backend) == ("NVIDIA GeForce RTX 4090", "simulated", "cuda")
    assert rtx4090.total_bytes == rtx4090.free_bytes == 24564 * 2**20
    assert rtx4090.bandwidth_bytes_per_s == 1008e9
    assert rtx4080.total_bytes == rtx4080.free_bytes == 16376 * 2**20
    assert rtx4080.bandwidth_bytes_per_s == 716.8e9


def test_amd_cards_simulate_the_rocm_backend() -> None:
    (xtx,) = simulated_devices("rx 7900 xtx")
    assert (xtx.backend, xtx.total_bytes, xtx.bandwidth_bytes_per_s) == ("rocm", 25753026560, 960e9)


def test_bare_sizes_are_cuda_cards_without_bandwidth() -> None:
    big, small = simulated_devices("24GiB, 16GiB")
    assert (big.name, big.backend, big.total_bytes, big.free_bytes) == ("24GiB GPU", "cuda", 24 * GIB, 24 * GIB)
    assert (small.total_bytes, small.bandwidth_bytes_per_s) == (16 * GIB, None)


def test_count_prefix_repeats_a_card() -> None:
    devices = simulated_devices("2x RTX 4090, 1 x 16GiB, 3X4080")
    assert [d.total_bytes for d in devices] == [24564 * 2**20] * 2 + [16 * GIB] + [16376 * 2**20] * 3


def test_colon_sets_free_memory_below_total() -> None:
    rtx4090, sized = simulated_devices("RTX 4090:20GiB,24GiB:22GiB")
    assert (rtx4090.total_bytes, rtx4090.free_bytes) == (24564 * 2**20, 20 * GIB)
    assert (sized.total_bytes, sized.free_bytes) == (24 * GIB, 22 * GIB)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("RTX 4909", r"unknown GPU 'RTX 4909': not in the catalog of \d+ cards; did you mean RTX 4090\?"),
        ("Radeon 7900 XTXX", r"unknown GPU 'Radeon 7900 XTXX'.*did you mean RX 7900 XTX"),
        ("Voodoo 5", r"unknown GPU 'Voodoo 5': not in the catalog of \d+ cards; give the memory size instead"),
        ("RTX 4090:30GiB", r"free memory 30.00 GiB exceeds its total 23.99 GiB"),
        ("RTX 4090:lots", r"what follows ':' must be the free memory as a size"),
        ("RTX 4090,,24GiB", r"has an empty item"),
        ("0x RTX 4090", r"describes no GPU"),
        ("   ", r"--gpus is empty"),
    ],
)
def test_bad_specs_raise_one_line_with_the_fix(spec: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message) as caught:
        simulated_devices(spec)
    assert "\n" not in str(caught.value)


# --- JSON inventory files ----------------------------------------------------------------------------


def write_json(tmp_path: Path, content: object) -> str:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_json_file_describes_catalog_and_custom_cards(tmp_path: Path) -> None:
    path = write_json(
        tmp_path,
        [
            {"name": "RTX 4090", "free": "20GiB"},
            {"name": "lab card", "total": 12 * GIB, "bandwidth": 360, "backend": "rocm"},
            {"name": "RTX 3090", "total": "23GiB"},
        ],
    )
    rtx4090, custom, rtx3090 = simulated_devices(path)
    assert (rtx4090.name, rtx4090.total_bytes, rtx4090.free_bytes) == ("RTX 4090", 24564 * 2**20, 20 * GIB)
    assert rtx4090.bandwidth_bytes_per_s == 1008e9
    assert (custom.backend, custom.total_bytes, custom.free_bytes) == ("rocm", 12 * GIB, 12 * GIB)
    assert custom.bandwidth_bytes_per_s == 360e9
    assert (rtx3090.total_bytes, rtx3090.bandwidth_bytes_per_s) == (23 * GIB, 936.2e9)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"name": "RTX 4090"}, r"must be a non-empty JSON list of GPU objects"),
        ([], r"must be a non-empty JSON list"),
        ([{"name": "lab card"}], r"unknown GPU 'lab card'"),
        ([{"name": "RTX 4090", "colour": "green"}], r"entry 0: colour: Extra inputs are not permitted"),
        ([{"name": "RTX 4090"}, {"name": "RTX 4080", "backend": "metal"}], r"entry 1: backend: Input should be"),
        ([{"name": "x", "total": "big"}], r"'big' is not a memory size"),
        ([{"name": "x", "total": -5}], r"memory size -5 is negative"),
    ],
)
def test_bad_json_inventories_name_the_entry_and_field(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        simulated_devices(write_json(tmp_path, content))


def test_unreadable_json_inventories(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"name": "RTX 4090",]')
    with pytest.raises(InventoryError, match=r"broken.json is not valid JSON"):
        simulated_devices(str(broken))
    with pytest.raises(InventoryError, match=r"cannot read the GPU inventory .*missing.json: No such file"):
        simulated_devices(str(tmp_path / "missing.json"))


# --- discover_devices --------------------------------------------------------------------------------


def test_public_api_is_exported() -> None:
    for name in tuner.inventory.__all__:
        assert getattr(tuner.inventory, name) is not None
    assert set(tuner.inventory.__all__) >= {"discover_devices", "lookup_gpu", "simulated_devices"}


def test_gpus_spec_gives_the_simulated_inventory_without_probing_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    # A probe importing either library would get this object, and its first call would fail the test.
    class Untouchable:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"driver library touched: {name}")

    monkeypatch.setitem(sys.modules, "pynvml", Untouchable())
    monkeypatch.setitem(sys.modules, "amdsmi", Untouchable())
    assert [d.kind for d in discover_devices(gpus="RTX 4090,24GiB")] == ["simulated", "simulated"]


def test_gpus_spec_and_rpc_endpoints_together_are_refused() -> None:
    with pytest.raises(InventoryError, match=r"cannot be combined with --rpc 127\.0\.0\.1:50052; drop one"):
        discover_devices(rpc=["127.0.0.1:50052"], gpus="RTX 4090")


def test_real_devices_come_rpc_first_then_nvidia_then_amd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rpc_endpoints: list[str]
) -> None:
    from tests.test_inventory_nvidia import RECORDED, FakeNvml

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(list(RECORDED)).module())
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    # A rocm-smi on PATH, answering for the AMD box.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = FIXTURES / "rocm_smi_rx7900xtx_rx7800xt.json"
    rocm_smi = bin_dir / "rocm-smi"
    rocm_smi.write_text(f"#!{sys.executable}\nprint(open({str(answer)!r}).read())\n")
    rocm_smi.chmod(rocm_smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    for variable in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(variable, raising=False)

    devices = discover_devices(rpc=rpc_endpoints[:2])

    assert [d.kind for d in devices] == ["rpc", "rpc", "cuda", "cuda", "rocm", "rocm"]
    assert [d.endpoint for d in devices[:2]] == rpc_endpoints[:2]
    assert [d.name for d in devices[2:]] == [
        "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4080", "AMD Radeon RX 7900 XTX", "AMD Radeon RX 7800 XT"
    ]  # fmt: skip
