"""`tune-split`: plan how llama.cpp should place a GGUF model across your GPUs.

Example — a 70B Q4_K_M model on an RTX 4090 beside an RTX 4080, largest context that fits:

    tune-split models/llama-3.3-70b-q4_k_m.gguf --gpus "RTX 4090,RTX 4080" --max-ctx

Check a split you already use (same table, with a verdict):

    tune-split models/llama-3.3-70b-q4_k_m.gguf --gpus 24GiB,16GiB --tensor-split 3,2 --ctx 8192

Before downloading: plan a model on the Hugging Face Hub from its header alone (a few MB of range requests),
or list every quantisation of a repo with its verdict (HF_TOKEN or `hf auth login` for gated repos):

    tune-split bartowski/Llama-3.3-70B-Instruct-GGUF:Q4_K_M --gpus "RTX 4090,RTX 4080"
    tune-split bartowski/Llama-3.3-70B-Instruct-GGUF --gpus "RTX 4090,RTX 4080"

Calibrate the tensor-split all-reduce from one measured run (e.g. llama-bench -sm tensor -ts 1,1 -ngl 99 -p 0
-n 128, its tg128 tokens/s), then plan other runs on the same cards with the figure it prints:

    tune-split models/llama-3.3-70b-q4_k_m.gguf --split-mode tensor -ts 1,1 -ngl 81 --ctx 4096 \
        --calibrate-allreduce 27.4
    tune-split models/other.gguf --objective latency --allreduce-step-us 41.3

Tables go to stdout, logs to stderr; `--format json` is for scripts (schema: tuner.plan.Plan).
Exit status: 0 the plan fits, 3 it does not fit, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console

from tuner.errors import TunerError
from tuner.plan import CACHE_TYPES, MiB, Plan, PlanRequest

if TYPE_CHECKING:
    from tuner.devices import Device
    from tuner.hub import Hub
    from tuner.hubref import HubReference
    from tuner.model import ModelInfo
    from tuner.speed import SpeedModel

EXIT_DOES_NOT_FIT = 3


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _float(text: str, *, zero_allowed: bool) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not (value >= 0 if zero_allowed else value > 0):  # written so that NaN fails too
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_allowed else 'above 0'}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, zero_allowed=False)


def _non_negative_float(text: str) -> float:
    return _float(text, zero_allowed=True)


def _split(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace("/", ",").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 3,2, got {text!r}") from exc
    if any(v < 0 for v in values) or not any(values):
        raise argparse.ArgumentTypeError(f"proportions must be non-negative and not all zero, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune-split",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help="GGUF file (for a split model, any of its parts), or on the Hugging Face Hub: OWNER/REPO:QUANT, "
        "OWNER/REPO/FILE.gguf, a resolve URL, or OWNER/REPO to list its quantisations",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpus", help='simulate cards: "RTX 4090,RTX 4080", "24GiB,16GiB" or a JSON file')
    where.add_argument("--rpc", help="llama.cpp RPC servers host:port,... (listed before local GPUs)")
    ctx = parser.add_mutually_exclusive_group()
    ctx.add_argument("--ctx", "-c", type=_positive_int, help="context size (default 4096, capped at training)")
    ctx.add_argument("--max-ctx", action="store_true", help="find the largest context that fits on the GPUs")
    parser.add_argument("--parallel", "-np", type=_positive_int, default=1, help="parallel sequences (default 1)")
    parser.add_argument("--cache-type-k", "-ctk", choices=CACHE_TYPES, default="f16")
    parser.add_argument("--cache-type-v", "-ctv", choices=CACHE_TYPES, default="f16")
    parser.add_argument("--flash-attn", "-fa", choices=("on", "off", "auto"), default="auto")
    parser.add_argument("--batch", "-b", type=_positive_int, help="logical batch size (default: --ubatch)")
    parser.add_argument("--ubatch", "-ub", type=_positive_int, default=512, help="physical batch (default 512)")
    parser.add_argument("--kv-unified", action="store_true", help="one KV buffer shared by all sequences")
    parser.add_argument(
        "--swa-full",
        choices=("on", "off"),
        default="on",
        help="full-size cache for sliding-window layers (on: llama-cpp-python's default)",
    )
    parser.add_argument("--reserve", type=_non_negative_int, default=512, help="MiB kept free per GPU (default 512)")
    parser.add_argument(
        "--objective",
        choices=("speed", "balanced", "latency", "throughput"),
        default="speed",
        help="speed: fastest layer split; balanced: equal headroom; latency / throughput: pick layer or tensor "
        "split by single-stream or batched speed",
    )
    parser.add_argument(
        "--split-mode",
        "-sm",
        choices=("layer", "tensor", "row", "none"),
        help="layer (default), tensor (tensor parallelism), none (one device); row is rated unavailable",
    )
    parser.add_argument("--tensor-split", "-ts", type=_split, help="evaluate this split instead of planning one")
    parser.add_argument("--n-gpu-layers", "-ngl", type=_non_negative_int, help="entries on GPUs (output included)")
    parser.add_argument("--main-gpu", "-mg", type=_non_negative_int)
    parser.add_argument("--host-ram", type=float, help="GiB of RAM available for CPU layers (default: unchecked)")
    allreduce = parser.add_mutually_exclusive_group()
    allreduce.add_argument(
        "--calibrate-allreduce",
        type=_positive_float,
        metavar="TOKENS_PER_S",
        help="single-stream decode speed measured for a -sm tensor run with these settings (model, cards, -ts, "
        "-ngl, -c): fit the all-reduce step latency to it and plan with that (docs/TUNER.md)",
    )
    allreduce.add_argument(
        "--allreduce-step-us",
        type=_non_negative_float,
        metavar="US",
        help="all-reduce step latency for split mode tensor, e.g. what --calibrate-allreduce printed "
        "(default 25: PCIe 4.0 without peer-to-peer)",
    )
    parser.add_argument("--measure", action="store_true", help="also run llama.cpp's own dry run on the devices")
    parser.add_argument("--format", choices=("table", "json", "flags", "env"), default="table")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest(
        n_ctx=args.ctx,
        max_ctx=args.max_ctx,
        n_seq_max=args.parallel,
        type_k=args.cache_type_k,
        type_v=args.cache_type_v,
        flash_attn=args.flash_attn,
        n_batch=args.batch,
        n_ubatch=args.ubatch,
        kv_unified=args.kv_unified,
        swa_full=args.swa_full == "on",
        reserve_bytes=args.reserve * MiB,
        objective=args.objective,
        split_mode=args.split_mode,
        tensor_split=args.tensor_split,
        n_gpu_layers=args.n_gpu_layers,
        main_gpu=args.main_gpu,
        host_free_bytes=int(args.host_ram * 1024 * MiB) if args.host_ram is not None else None,
    )


def run(args: argparse.Namespace, out: Console) -> int:
    from tuner.hubref import looks_remote
    from tuner.inventory import discover_devices

    request = request_from_args(args)
    rpc = [e.strip() for e in args.rpc.split(",") if e.strip()] if args.rpc else []
    if looks_remote(args.model):
        return run_hub(args, out, request, rpc)
    devices = discover_devices(rpc=rpc, gpus=args.gpus)
    plan = plan_with_speed(args.model, request, devices, args)
    if args.measure:
        from tuner.measure import attach_measurement

        plan = attach_measurement(plan, rpc)
    return emit(plan, args, out)


def speed_from_args(args: argparse.Namespace) -> SpeedModel:
    """The speed model with the all-reduce latency the user gave (the assumed one otherwise)."""
    import dataclasses

    from tuner.speed import DEFAULT_SPEED_MODEL

    if args.allreduce_step_us is None:
        return DEFAULT_SPEED_MODEL
    return dataclasses.replace(DEFAULT_SPEED_MODEL, allreduce_step_s=args.allreduce_step_us * 1e-6)


def plan_with_speed(
    model: str | ModelInfo, request: PlanRequest, devices: list[Device], args: argparse.Namespace
) -> Plan:
    """The plan, with the speed model the flags ask for; --calibrate-allreduce fits it to the measured run first
    and says so on stderr."""
    from tuner.api import plan_model
    from tuner.gguf import read_model
    from tuner.tensor_planner import calibrate_allreduce_from_run

    speed = speed_from_args(args)
    if args.calibrate_allreduce is None:
        return plan_model(model, request, devices, strict=False, speed=speed)
    info = read_model(model) if isinstance(model, str) else model
    calibration = calibrate_allreduce_from_run(info, devices, request, args.calibrate_allreduce, speed)
    print(f"tune-split: {calibration.describe()}", file=sys.stderr)
    return calibration.plan


def emit(plan: Plan, args: argparse.Namespace, out: Console) -> int:
    """Print the plan in the chosen format; the exit status says whether it fits."""
    from tuner.render import plan_env, plan_flags, plan_json, render_plan

    if args.format == "json":
        out.print_json(plan_json(plan)) if out.is_terminal else print(plan_json(plan))
    elif args.format == "flags":
        print(" ".join(plan_flags(plan)))
    elif args.format == "env":
        for name, value in plan_env(plan).items():
            print(f"{name}={value}")
    else:
        out.print(render_plan(plan, width=out.width))
    if not plan.fits:
        if args.format != "table":
            print(f"tune-split: {plan.verdict}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


def run_hub(args: argparse.Namespace, out: Console, request: PlanRequest, rpc: list[str]) -> int:
    """A model on the Hugging Face Hub: plan it from its header, or list the repo's quantisations."""
    from tuner.errors import HubError
    from tuner.hub import Hub
    from tuner.inventory import discover_devices

    if args.measure:
        raise HubError("--measure loads the model with llama.cpp; download it first (llamasplit pull ...)")
    hub = Hub()
    ref = hub.parse(args.model)
    if ref is None:  # looks_remote said otherwise; only a file created in between gets here
        raise HubError(f"{args.model}: neither a local file nor a Hub reference")
    devices = discover_devices(rpc=rpc, gpus=args.gpus)
    if ref.is_repo:
        return run_listing(hub, ref, args, out, request, devices)
    listing, model = hub.resolve(ref)
    info, stats = hub.read_model(listing, model)
    print(f"tune-split: read {ref} at {listing.commit[:12]} from the Hub: {stats.describe()}", file=sys.stderr)
    return emit(plan_with_speed(info, request, devices, args), args, out)


def run_listing(
    hub: Hub, ref: HubReference, args: argparse.Namespace, out: Console, request: PlanRequest, devices: list[Device]
) -> int:
    """Every quantisation in the repo with its verdict: the answer to "which one should I download?"."""
    from tuner.errors import PlanRequestError
    from tuner.quants import options_json, plan_options, render_options

    if args.format in ("flags", "env"):
        raise PlanRequestError(f"--format {args.format} needs one model; name a quantisation, e.g. {ref}:Q4_K_M")
    if args.calibrate_allreduce is not None or args.allreduce_step_us is not None:
        raise PlanRequestError(f"the all-reduce flags need one model; name a quantisation, e.g. {ref}:Q4_K_M")
    if request.n_ctx is None and not request.max_ctx:
        # The question a listing answers is "at what context", so each row gets the largest that fits.
        request = request.model_copy(update={"max_ctx": True})
    listing = hub.listing(ref)
    if not listing.models:
        raise PlanRequestError(f"{ref}: the repo holds no GGUF files")
    options, stats = plan_options(hub, listing, request, devices)
    headers = f"{stats.files} header{'s' if stats.files != 1 else ''}"
    print(f"tune-split: read {headers} of {ref} from the Hub: {stats.describe()}", file=sys.stderr)
    if args.format == "json":
        text = options_json(listing, options, stats)
        out.print_json(text) if out.is_terminal else print(text)
    else:
        out.print(render_options(listing, options, devices, request))
        print(f"download one with: llamasplit pull {ref.repo_id}:QUANT [--dir models/]", file=sys.stderr)
    return 0 if any(o.fits for o in options) else EXIT_DOES_NOT_FIT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    # Piped output must not be squeezed to 80 columns: the table is ~170 wide.
    terminal = Console()
    out = terminal if terminal.is_terminal else Console(width=200)
    try:
        return run(args, out)
    except TunerError as exc:
        if args.debug:
            raise
        print(f"tune-split: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
