"""`llamasplit pull`: download a GGUF from the Hugging Face Hub into models/, verified, and print its plan.

The reference is what `tune-split` accepts (OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf, a resolve URL); a bare
OWNER/REPO takes the largest quantisation whose every layer fits on the devices at the chosen context (planned
from the headers alone, before anything is downloaded) and says why. Every part of a split GGUF is fetched.
Exit status: 0 downloaded (or already there), 2 bad input or a Hub error, 3 no quantisation fits, 130 interrupted
(run the same command again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner import HubError

if TYPE_CHECKING:
    from server.download import PlannedFile
    from tuner import Device, Hub, HubReference, PlanRequest, RemoteModel

PULL_HELP = """\
Download a GGUF model from the Hugging Face Hub into models/ and print the tuner's plan for it.

Downloads resume after an interruption, every part of a split GGUF is fetched, each file is checked against
the Hub's sha256 before it takes its final name. Gated and private repos need HF_TOKEN or `hf auth login`;
HF_ENDPOINT and HF_HUB_OFFLINE are honoured.

example:
  llamasplit pull bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M
  llamasplit pull bartowski/Llama-3.3-70B-Instruct-GGUF --gpus "RTX 4090,RTX 4080" --ctx 8192
"""


def add_pull_parser(sub: Any) -> None:
    """Register `llamasplit pull` on the CLI's subparsers (``sub`` is argparse's _SubParsersAction)."""
    pull = sub.add_parser(
        "pull", help="download a GGUF from the Hugging Face Hub and plan it", description=PULL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = pull.add_argument
    add("reference", help="OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf, a resolve URL, or OWNER/REPO (largest that fits)")
    add("--dir", type=Path, default=Path("models"), help="folder to download into (default models/)")
    add("--gpus", help='plan for these cards instead of this machine\'s: "RTX 4090,RTX 4080" or "24GiB,16GiB"')
    add("-c", "--ctx", type=_positive_int, help="context to fit (default 4096, capped at the model's training context)")
    add("--host-ram", type=float, help="GiB of RAM for CPU layers (default: what the system reports available)")
    add("--debug", action="store_true", help="show tracebacks")
    pull.set_defaults(run=run_pull)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_pull(args: argparse.Namespace) -> int:
    from tuner import Hub, PlanRequest, discover_devices

    hub = Hub()
    ref = hub.parse(args.reference)
    if ref is None:
        raise HubError(
            f"{args.reference}: not a Hub reference; write OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf or a resolve URL"
        )
    devices = discover_devices(gpus=args.gpus)
    host_bytes = int(args.host_ram * 1024**3) if args.host_ram is not None else host_available_bytes()
    request = PlanRequest(n_ctx=args.ctx, host_free_bytes=host_bytes)
    if _offline():
        return _plan_local(_local_copy(ref, args.dir), request, devices, "HF_HUB_OFFLINE is set: not asking the Hub")
    downloading: PlannedFile | None = None
    try:
        files = _resolve(hub, ref, request, devices, args.dir)
        from server.download import check_disk_space, fetch, install, matches

        args.dir.mkdir(parents=True, exist_ok=True)
        check_disk_space(files)
        verified = []
        for file in files:
            if file.dest.exists():
                if not matches(file.dest, file.location, file.repo_path):
                    raise HubError(
                        f"{file.dest} exists and is not {ref.repo_id}/{file.repo_path}; move it away or use --dir"
                    )
                print(f"{file.dest} is already here and matches the Hub's checksum", file=sys.stderr)
                continue
            downloading = file
            verified.append((fetch(hub, file), file.dest))
            downloading = None
        install(verified)
    except KeyboardInterrupt:
        if downloading is not None:
            print(
                f"llamasplit: interrupted; {downloading.partial_bytes:,} of {downloading.location.size:,} bytes are "
                f"kept in {downloading.partial}; run the same command to resume",
                file=sys.stderr,
            )
        return 130
    where = ", ".join(str(f.dest) for f in files)
    print(f"llamasplit: {ref} is in {where} (checksums verified)", file=sys.stderr)
    return _plan_local(files[0].dest, request, devices)


def _resolve(
    hub: Hub, ref: HubReference, request: PlanRequest, devices: list[Device], folder: Path
) -> list[PlannedFile]:
    """The files to download: the model ``ref`` names, or the largest quantisation that fits."""
    from server.download import PlannedFile
    from tuner import choose_quantisation as choose
    from tuner import plan_quantisations as plan_options
    from tuner import select_model

    listing = hub.listing(ref)
    model: RemoteModel
    if ref.is_repo:
        options, stats = plan_options(hub, listing, request, devices)
        print(f"llamasplit: planned {len(options)} models from their headers: {stats.describe()}", file=sys.stderr)
        option, reason = choose(options, ref.repo_id)
        print(f"llamasplit: {reason}", file=sys.stderr)
        model = option.model
    else:
        model = select_model(listing.models, ref)
    # Flattened into the folder: llama.cpp finds a split model's parts beside its first part.
    return [
        PlannedFile(
            listing.repo_id, f.path, hub.locate(listing.repo_id, f.path, listing.commit), folder / Path(f.path).name
        )
        for f in model.files
    ]


def _plan_local(path: Path, request: PlanRequest, devices: list[Device], note: str | None = None) -> int:
    from rich.console import Console

    from tuner import plan_model, render_plan

    if note:
        print(f"llamasplit: {note}; planning {path}", file=sys.stderr)
    plan = plan_model(path, request, devices, strict=False)
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(render_plan(plan))
    return 0


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _local_copy(ref: HubReference, folder: Path) -> Path:
    """Offline: the copy of ``ref`` a previous pull left in ``folder``, found by file name or quantisation tag."""
    from tuner import SPLIT_NAME, quant_tag

    found: list[Path] = []
    if ref.filename is not None:
        name = Path(ref.filename).name
        match = SPLIT_NAME.match(name)
        if match:  # any part names the model; its first part is what gets planned
            name = f"{match['prefix']}-00001-of-{match['count']}.gguf"
        found = [folder / name] if (folder / name).is_file() else []
    elif ref.tag is not None:
        wanted = ref.tag.upper()
        candidates = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        found = [
            p for p in candidates
            if quant_tag(p.name) == wanted and (not SPLIT_NAME.match(p.name) or "-00001-of-" in p.name)
        ]  # fmt: skip
    if len(found) != 1:
        what = "no copy" if not found else f"{len(found)} copies ({', '.join(p.name for p in found)})"
        raise HubError(
            f"{ref}: HF_HUB_OFFLINE is set and {folder}/ holds {what} of it; unset HF_HUB_OFFLINE to download, "
            "or plan a file with tune-split"
        )
    return found[0]


def host_available_bytes() -> int | None:
    """RAM for CPU layers: Linux's MemAvailable (free plus reclaimable cache); None (unchecked) elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
