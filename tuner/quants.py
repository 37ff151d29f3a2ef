"""Which quantisation to download: plan every GGUF of a Hub repo from its header alone, and pick one.

`tune-split owner/repo` prints the table (fits? at what context? how many layers on the GPUs? how fast?);
`llamasplit pull owner/repo` downloads the largest quantisation whose every layer fits on the devices.
Each row is planned exactly as `tune-split FILE` would plan the downloaded file with the same flags.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from tuner.api import plan_model
from tuner.devices import Device
from tuner.errors import DoesNotFitError, PlanRequestError
from tuner.hub import FetchStats, Hub, RepoListing
from tuner.hubref import RemoteModel
from tuner.plan import Plan, PlanRequest
from tuner.render import format_bytes, short_name

GiB = 1024**3


@dataclass(frozen=True)
class QuantOption:
    """One model of the repo and its plan (None, with ``error``, when its header could not be planned)."""

    model: RemoteModel
    plan: Plan | None
    error: str | None = None

    @property
    def on_devices(self) -> bool:
        """Every layer (and the output layer) on the GPUs: the only placement that decodes at GPU speed."""
        plan = self.plan
        return plan is not None and plan.fits and bool(plan.devices) and plan.n_gpu_layers >= plan.n_layer + 1

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    @property
    def verdict(self) -> str:
        plan = self.plan
        if plan is None:
            return "unreadable"
        if not plan.fits:
            return "no"
        if not plan.devices:
            return "CPU only"
        return "yes" if self.on_devices else "partly"

    def describe(self) -> str:
        """One clause on how it fits, for the reasons pull gives."""
        plan = self.plan
        if plan is None:
            return f"cannot be planned ({self.error})"
        if not plan.fits:
            return f"does not fit ({plan.verdict.removeprefix('does not fit: ')})"
        if not plan.devices:
            return f"fits in host RAM at context {plan.n_ctx}"
        if self.on_devices:
            return f"fits with every layer on the GPUs at context {plan.n_ctx}"
        return f"keeps only {plan.n_gpu_layers} of {plan.n_layer + 1} layers on the GPUs at context {plan.n_ctx}"


def plan_options(
    hub: Hub, listing: RepoListing, request: PlanRequest, devices: Sequence[Device]
) -> tuple[list[QuantOption], FetchStats]:
    """Read every complete model's header (side by side) and plan it; returns the options smallest first."""
    stats = FetchStats()
    options: list[QuantOption] = []
    complete = [m for m in listing.models if m.complete]
    for read in hub.read_models(listing, complete):
        stats.add(read.stats)
        if read.info is None:
            options.append(QuantOption(read.model, None, read.error))
            continue
        try:
            options.append(QuantOption(read.model, plan_model(read.info, request, devices, strict=False)))
        except PlanRequestError as exc:  # e.g. --tensor-split for another device count: the same for every row
            raise PlanRequestError(f"{read.model.path}: {exc}") from exc
    for model in listing.models:
        if not model.complete:
            missing = f"{len(model.files)} of its {model.expected_parts} parts are in the repo"
            options.append(QuantOption(model, None, missing))
    options.sort(key=lambda o: (o.model.size, o.model.path))
    return options, stats


def choose(options: Sequence[QuantOption], repo_id: str) -> tuple[QuantOption, str]:
    """The largest quantisation that fits (every layer on the GPUs; in host RAM when there are none) and why.

    Raises DoesNotFitError, naming the closest option, when none does.
    """
    planned = [o for o in options if o.plan is not None]
    if not planned:
        raise DoesNotFitError(f"{repo_id}: none of its GGUF files can be planned; name a file to see why")
    has_devices = any(o.plan is not None and o.plan.devices for o in planned)
    good = [o for o in planned if (o.on_devices if has_devices else o.fits)]
    if not good:
        smallest = planned[0]
        where = "entirely on the GPUs" if has_devices else "in host RAM"
        raise DoesNotFitError(
            f"no quantisation of {repo_id} fits {where}; the smallest, {smallest.model.label} "
            f"({format_bytes(smallest.model.size)}), {smallest.describe()}. Lower --ctx, or name one with "
            f"{repo_id}:QUANT to take it anyway"
        )
    best = max(good, key=lambda o: (o.model.size, o.model.path))
    larger = [o for o in planned if o.model.size > best.model.size]
    reason = f"{best.model.label} ({format_bytes(best.model.size)}) is the largest quantisation that {best.describe()}"
    if larger:
        nearest = larger[0]
        reason += f"; the next larger, {nearest.model.label} ({format_bytes(nearest.model.size)}), {nearest.describe()}"
    return best, reason


def render_options(
    listing: RepoListing, options: Sequence[QuantOption], devices: Sequence[Device], request: PlanRequest
) -> RenderableType:
    """The "which quant should I download?" table, with the devices and context it was planned for."""
    where = ", ".join(f"{short_name(d.name)} ({format_bytes(d.free_bytes)} free)" for d in devices) or "no GPU (CPU)"
    context = f"context {request.n_ctx}" if request.n_ctx else "the largest context with every layer on the GPUs"
    heading = Text(f"{listing.repo_id} @ {listing.commit[:12]}\nplanned for {where}, at {context}")
    table = Table(show_lines=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("quant", "left"), ("size", "right"), ("files", "right"), ("fits", "left"), ("context", "right"),
        ("GPU layers", "right"), ("tokens/s", "right"), ("file", "left"),
    )  # fmt: skip
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)
    styles = {"yes": "bold green", "partly": "yellow", "CPU only": "", "no": "red", "unreadable": "red"}
    notes: list[RenderableType] = []
    for option in options:
        plan = option.plan
        cells = ["-", "-", "-"]
        if plan is not None:
            speed = f"{plan.predicted_tokens_per_s:.0f}" if plan.predicted_tokens_per_s and plan.devices else "-"
            cells = [str(plan.n_ctx), f"{plan.n_gpu_layers}/{plan.n_layer + 1}", speed]
        else:
            notes.append(Text(f"{option.model.path}: {option.error}", style="dim"))
        table.add_row(
            Text(option.model.label),
            format_bytes(option.model.size),
            str(len(option.model.files)),
            Text(option.verdict, style=styles[option.verdict]),
            *cells,
            Text(option.model.path),
        )
    legend = Text(
        "yes: every layer on the GPUs · partly: the rest on the CPU (slow), at the default context · "
        "CPU only: no GPU found · no: does not fit",
        style="dim",
    )
    return Group(heading, table, legend, *notes)


def options_json(listing: RepoListing, options: Sequence[QuantOption], stats: FetchStats) -> str:
    """The table for scripts: one entry per model, each with the full plan (tuner.plan.Plan) or its error."""
    rows = [
        {
            "quant": o.model.tag,
            "path": o.model.path,
            "files": [f.path for f in o.model.files],
            "size_bytes": o.model.size,
            "fits": o.fits,
            "on_devices": o.on_devices,
            "verdict": o.verdict,
            "error": o.error,
            "plan": o.plan.model_dump(mode="json") if o.plan is not None else None,
        }
        for o in options
    ]
    body = {
        "repo_id": listing.repo_id,
        "commit": listing.commit,
        "bytes_fetched": stats.bytes_fetched,
        "requests": stats.requests,
        "models": rows,
    }
    return json.dumps(body, indent=2)
