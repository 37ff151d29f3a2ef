"""Turn a Plan into what people and scripts read: a rich table, JSON, llama-server flags, or env variables."""

from __future__ import annotations

import json
import shlex

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from tuner.plan import DevicePlan, Plan

MiB = 1024 * 1024
GiB = 1024 * MiB
BAR_WIDTH = 32
BAR_SEGMENTS = (  # (attribute, glyph, style): weights / KV / compute / overhead, then reserve and free
    ("weights_bytes", "█", "bright_blue"),
    ("kv_bytes", "█", "green"),
    ("compute_bytes", "█", "yellow"),
    ("overhead_bytes", "█", "magenta"),
)


def format_bytes(n_bytes: int) -> str:
    if abs(n_bytes) >= GiB:
        return f"{n_bytes / GiB:.2f} GiB"
    return f"{n_bytes / MiB:.1f} MiB"


def _bar(device: DevicePlan) -> Text:
    capacity = max(device.free_bytes, device.total_bytes + device.reserve_bytes, 1)
    bar = Text()
    used_cells = 0
    for attribute, glyph, style in BAR_SEGMENTS:
        cells = round(getattr(device, attribute) / capacity * BAR_WIDTH)
        bar.append(glyph * cells, style=style)
        used_cells += cells
    reserve_cells = min(round(device.reserve_bytes / capacity * BAR_WIDTH), max(BAR_WIDTH - used_cells, 0))
    bar.append("░" * reserve_cells, style="grey50")
    remaining = BAR_WIDTH - used_cells - reserve_cells
    bar.append("·" * max(remaining, 0), style="grey35")
    if remaining < 0:
        bar.append(" over", style="bold red")
    return bar


def _layers(device: DevicePlan, n_layer: int) -> str:
    if device.layers is None:
        return "-"
    first, last = device.layers
    text = f"{first}-{min(last, n_layer - 1)}" if first < n_layer else ""
    if device.holds_output:
        text = f"{text} +out" if text else "out"
    return text


# Vendor prefixes that cost a narrow terminal its numbers; the kind column already says what the card is.
_NAME_PREFIXES = ("NVIDIA GeForce ", "NVIDIA ", "AMD Radeon ", "AMD ")
_KIND_TAGS = {"simulated": "sim"}
# Below this many columns the bar is left out so that the numbers stay readable.
BAR_MIN_WIDTH = 150


def short_name(name: str) -> str:
    for prefix in _NAME_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def render_plan(plan: Plan, width: int | None = None) -> RenderableType:
    """The plan as a table per device (with a memory bar when ``width`` allows) plus the settings, host
    usage, verdict, llama-server command and the split modes' verdicts."""
    with_bar = width is None or width >= BAR_MIN_WIDTH
    # Narrow terminals: bare GiB figures (the unit moves to the title) so that no number is cut.
    size = format_bytes if with_bar else (lambda n_bytes: f"{n_bytes / GiB:.2f}")
    title = (
        f"{plan.model_name} ({plan.architecture}, {plan.n_layer} layers) · ctx {plan.n_ctx} x{plan.n_seq_max} · "
        f"KV {plan.type_k}/{plan.type_v} · flash-attn {'on' if plan.flash_attn else 'off'} · split {plan.split_mode}"
        + ("" if with_bar else " · sizes in GiB")
    )
    table = Table(title=title, title_justify="left", show_lines=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("#", "right"), ("device", "left"), ("layers", "left"), ("weights", "right"), ("KV", "right"),
        ("compute", "right"), ("overhead", "right"), ("total", "right"), ("free", "right"), ("left", "right"),
    ]
    if with_bar:
        columns.append(("memory", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)
    for device in plan.devices:
        left_style = "red" if device.free_after_bytes < 0 else ""
        row: list[RenderableType] = [
            str(device.index),
            Text(f"{short_name(device.name)} [{_KIND_TAGS.get(device.kind, device.kind)}]"),  # Text: not markup
            _layers(device, plan.n_layer),
            size(device.weights_bytes),
            size(device.kv_bytes),
            size(device.compute_bytes),
            size(device.overhead_bytes),
            size(device.total_bytes),
            size(device.free_bytes),
            Text(size(device.free_after_bytes), style=left_style),
        ]
        table.add_row(*row, *([_bar(device)] if with_bar else []))
    host = plan.host
    host_layers = f"{host.layers[0]}-{host.layers[1]}" if host.layers else "embd"
    table.add_row(
        "", Text("host RAM [cpu]"), host_layers, size(host.weights_bytes), size(host.kv_bytes),
        size(host.compute_bytes), "", size(host.total_bytes), "", "", *([""] if with_bar else []),
    )
    lines: list[RenderableType] = [table]
    if with_bar and plan.devices:
        legend = Text("memory: ")
        for label, (_, glyph, style) in zip(("weights", "KV", "compute", "overhead"), BAR_SEGMENTS, strict=True):
            legend.append(glyph, style=style).append(f" {label}  ")
        legend.append("░", style="grey50").append(" reserve  ").append("·", style="grey35").append(" free")
        lines.append(legend)
    # The decode-speed model is calibrated on GPUs; a CPU-only figure would depend on cores it does not model.
    show_speed = plan.predicted_tokens_per_s and plan.devices
    speed = f", ~{plan.predicted_tokens_per_s:.0f} tokens/s single stream" if show_speed else ""
    verdict_style = "bold green" if plan.fits else "bold red"
    lines.append(Text(f"{'FITS' if plan.fits else 'DOES NOT FIT'} — {plan.verdict}{speed}", style=verdict_style))
    lines.append(Text(concurrency_line(plan)))
    prefix = "CUDA_DEVICE_ORDER=PCI_BUS_ID " if any(d.backend == "cuda" for d in plan.devices) else ""
    command = prefix + "llama-server " + " ".join(shlex.quote(f) for f in plan_flags(plan))
    lines.append(Text(f"llama-server flags: {command}", style="dim"))
    if plan.alternatives:
        lines.append(Text(f"  {'split':<12} {'verdict':<12} {'1 stream':<12} {'batched':<13} note", "dim"))
    for alternative in plan.alternatives:
        rate = batch = "-"
        if alternative.fits and alternative.predicted_tokens_per_s:
            rate = f"~{alternative.predicted_tokens_per_s:.0f} tok/s"
        if alternative.fits and alternative.batch_tokens_per_s:
            batch = f"~{alternative.batch_tokens_per_s:.0f} tok/s"
        fits = "fits" if alternative.fits else "does not fit"
        line = f"  split {alternative.split_mode:<6} {fits:<12} {rate:<12} {batch:<13} {alternative.note}"
        lines.append(Text(line, "dim"))
    lines.extend(Text(f"warning: {w}", style="yellow") for w in plan.warnings)
    return Group(*lines)


def concurrency_line(plan: Plan) -> str:
    """How many users the plan's KV cache holds at once, and at what context each."""
    if plan.n_seq_max == 1:
        return f"concurrency: 1 request at a time, up to {plan.n_ctx:,} tokens"
    if plan.kv_unified:
        each = plan.n_ctx // plan.n_seq_max
        longest = min(plan.n_ctx, plan.n_ctx_train or plan.n_ctx)
        return (
            f"concurrency: {plan.n_seq_max} requests decoded together, sharing one cache of {plan.n_ctx:,} tokens: "
            f"{plan.n_seq_max} at {each:,} tokens each, or one up to {longest:,}"
        )
    return (
        f"concurrency: {plan.n_seq_max} requests decoded together, up to {plan.n_ctx_seq:,} tokens each "
        f"({plan.n_ctx:,} in all)"
    )


def _split_text(plan: Plan) -> str:
    return ",".join(f"{v:g}" for v in plan.tensor_split)


def plan_flags(plan: Plan) -> list[str]:
    """llama.cpp / llama-server flags that reproduce the plan (``--fit off``: the plan is already fitted)."""
    flags = ["-ngl", str(plan.n_gpu_layers), "-sm", plan.split_mode]
    if plan.split_mode != "none" and len(plan.tensor_split) > 1:
        flags += ["-ts", _split_text(plan)]
    flags += ["-mg", str(plan.main_gpu), "-c", str(plan.n_ctx), "-np", str(plan.n_seq_max)]
    flags += ["-b", str(plan.n_batch), "-ub", str(plan.n_ubatch), "-ctk", plan.type_k, "-ctv", plan.type_v]
    flags += ["-fa", "on" if plan.flash_attn else "off"]
    if plan.kv_unified:
        flags.append("-kvu")
    if plan.swa_full:
        flags.append("--swa-full")
    if plan.embeddings:
        flags.append("--embeddings")  # llama-server serves an embedding model only with it (pooling: the GGUF's)
    flags += ["--fit", "off"]
    return flags


def plan_env(plan: Plan) -> dict[str, str]:
    """The LLAMASPLIT_* variables `llamasplit serve` reads to load with exactly this plan."""
    return {
        "LLAMASPLIT_N_GPU_LAYERS": str(plan.n_gpu_layers),
        "LLAMASPLIT_SPLIT_MODE": plan.split_mode,
        "LLAMASPLIT_TENSOR_SPLIT": _split_text(plan),
        "LLAMASPLIT_MAIN_GPU": str(plan.main_gpu),
        "LLAMASPLIT_CTX": str(plan.n_ctx),
        "LLAMASPLIT_PARALLEL": str(plan.n_seq_max),
        "LLAMASPLIT_BATCH_SIZE": str(plan.n_batch),
        "LLAMASPLIT_UBATCH_SIZE": str(plan.n_ubatch),
        "LLAMASPLIT_CACHE_TYPE_K": plan.type_k,
        "LLAMASPLIT_CACHE_TYPE_V": plan.type_v,
        "LLAMASPLIT_FLASH_ATTN": "on" if plan.flash_attn else "off",
    }


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.model_dump(mode="json"), indent=2)
