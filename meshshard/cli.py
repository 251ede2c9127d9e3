"""The `meshshard` command.

Heavy imports (torch, transformers) happen inside the commands that need them. One module
for all the commands, longer than our usual module: each command is a thin declaration of
its options over code that lives elsewhere, and click reads best with them side by side.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from meshshard import __version__
from meshshard.config import DEFAULT_MODEL, DTYPES, Config
from meshshard.errors import MeshShardError
from meshshard.logs import setup_logging

F = TypeVar("F", bound=Callable[..., Any])


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except MeshShardError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshshard")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar="MESHSHARD_LOG_LEVEL",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="MESHSHARD_LOG_FORMAT",
    show_default=True,
    help="json: one object per line, with node and epoch on state changes.",
)
def cli(log_level: str, log_format: str) -> None:
    """Run one LLM across several devices as a chain of layer shards."""
    setup_logging(log_level, log_format)


peer_url_option = click.option(
    "--peer",
    default="http://127.0.0.1:8117",
    show_default=True,
    envvar="MESHSHARD_PEER_URL",
    help="Any peer's API URL.",
)
api_token_option = click.option(
    "--api-token",
    default=None,
    envvar="MESHSHARD_API_TOKEN",
    help="Bearer token, for a peer whose API requires one.",
)


def model_options(f: F) -> F:
    @click.option(
        "--model",
        default=DEFAULT_MODEL,
        envvar="MESHSHARD_MODEL",
        show_default=True,
        help="Embedded default, a local Hugging Face folder, or a hub id.",
    )
    @click.option(
        "--device",
        default="auto",
        envvar="MESHSHARD_DEVICE",
        show_default=True,
        help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps.",
    )
    @click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default=None,
        envvar="MESHSHARD_DTYPE",
        help="Default: bfloat16 on CUDA, float16 on MPS, float32 on CPU (exact answers).",
    )
    @click.option(
        "--quantize",
        type=click.Choice(["none", "int8", "int4"]),
        default="none",
        envvar="MESHSHARD_QUANTIZE",
        show_default=True,
        help="Weight-only quantization of the decoder layers (torchao); int4 on CUDA only.",
    )
    @functools.wraps(f)
    def wrapper(
        *args: Any, model: str, device: str, dtype: str | None, quantize: str, **kwargs: Any
    ) -> Any:
        config = Config(model=model, device=device, dtype=dtype, quantize=quantize)
        return f(*args, config=config, **kwargs)

    return wrapper  # type: ignore[return-value]


@cli.group()
def model() -> None:
    """Inspect the model."""


@model.command("info")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def model_info(config: Config, as_json: bool) -> None:
    """Which model, its units, size, and where the cache lives."""
    from meshshard.model.info import model_info as gather

    info = gather(config)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        click.echo(f"{key:<12} {value}")


@cli.command()
@click.argument("prompt")
@model_options
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System message (implies --chat).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 100))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible answers).")
@click.option(
    "--split",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Run as this many shards chained in one process.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the answer with ids and timing.")
def generate(
    prompt: str,
    config: Config,
    max_tokens: int,
    chat: bool,
    system: str | None,
    temperature: float,
    top_p: float,
    seed: int | None,
    split: int,
    as_json: bool,
) -> None:
    """Generate in this one process: the reference every mesh answer is compared against."""
    from meshshard.model.generate import LocalChain
    from meshshard.model.generate import generate as run
    from meshshard.model.sampling import SamplingParams
    from meshshard.model.shard import load_spec
    from meshshard.model.source import resolve_model
    from meshshard.model.text import TextCodec

    model_dir = resolve_model(config.model, config.cache_dir)
    spec = load_spec(model_dir)
    if split > spec.num_units:
        raise MeshShardError(f"--split {split} exceeds the model's {spec.num_units} units")
    cuts = [round(i * spec.num_units / split) for i in range(1, split)]
    p = config.placement()
    chain = LocalChain.load(model_dir, cuts, p.dtype, str(p.device), p.quantize)
    codec = TextCodec.load(model_dir)
    ids = codec.encode(prompt, chat=chat or system is not None, system=system)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    stream = codec.stream()
    tokens: list[int] = []
    start = time.perf_counter()
    first = 0.0
    for token in run(chain, ids, max_tokens, params, codec.stop_ids):
        if not tokens:
            first = time.perf_counter() - start
        tokens.append(token)
        piece = stream.push(token)
        if not as_json:
            click.echo(piece, nl=False)
    elapsed = time.perf_counter() - start
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": stream.text,
                    "tokens": tokens,
                    "prompt_tokens": len(ids),
                    "ttft_s": round(first, 4),
                    # The decode rate after the first token, as `ask` and the API report it.
                    "tokens_per_s": round((len(tokens) - 1) / (elapsed - first), 2)
                    if len(tokens) > 1 and elapsed > first
                    else None,
                    "shards": [[a, b] for a, b in ((s.start, s.end) for s in chain.shards)],
                }
            )
        )
    else:
        click.echo()


@cli.command("profile")
@model_options
@click.option("--context", default=64, show_default=True, type=click.IntRange(1, 8192))
@click.option("--repeats", default=15, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile_cmd(config: Config, context: int, repeats: int, as_json: bool) -> None:
    """Measure this device: time and bytes per unit, the planner's input."""
    from meshshard.model.generate import LocalChain
    from meshshard.model.profile import profile
    from meshshard.model.source import resolve_model

    p = config.placement()
    model_dir = resolve_model(config.model, config.cache_dir)
    chain = LocalChain.load(model_dir, (), p.dtype, str(p.device), p.quantize)
    result = profile(chain.shards, context=context, repeats=repeats)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(
        f"{result.model} ({result.dtype}) on {result.device}, {result.threads} threads, "
        f"context {result.context}"
    )
    click.echo(
        f"{'unit':<6} {'decode ms':>10} {'prefill ms/tok':>15} {'weights MB':>11} "
        f"{'KV B/tok':>9} {'out B/tok':>10}"
    )
    for u in result.units:
        click.echo(
            f"{u.name:<6} {u.decode_ms:>10.3f} {u.prefill_ms_per_token:>15.3f} "
            f"{u.weight_bytes / 1e6:>11.2f} {u.kv_bytes_per_token:>9} {u.out_bytes_per_token:>10}"
        )
    click.echo(f"{'total':<6} {result.decode_ms:>10.3f}")


def _address_option(flag: str, value: str) -> str:
    """host:port with the host resolved to an IPv4 address: a message for a peer is sealed
    for the address it is sent to, which the peer knows only by number."""
    import socket

    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshShardError(f"{flag} {value}: expected host:port")
    try:
        ip = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except OSError:
        raise MeshShardError(f"{flag} {value}: cannot resolve {host}") from None
    return f"{ip}:{int(port)}"


def _bytes_option(value: str | None) -> float | None:
    from meshshard.config import parse_bytes

    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@model_options
@click.option(
    "--port",
    default=7117,
    show_default=True,
    envvar="MESHSHARD_PORT",
    type=click.IntRange(1, 65535),
)
@click.option(
    "--interface",
    default=None,
    envvar="MESHSHARD_INTERFACE",
    help="Address to bind and announce on (mDNS stays on it). Default: all interfaces.",
)
@click.option(
    "--announce",
    default=None,
    envvar="MESHSHARD_ANNOUNCE",
    help="host:port other peers reach this one at, if not the interface and port "
    "(a port forward, a relay).",
)
@click.option("--name", default=None, envvar="MESHSHARD_NAME", help="Peer id (default host-port).")
@click.option("--priority", default=0, show_default=True, envvar="MESHSHARD_PRIORITY", type=int)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    envvar="MESHSHARD_PEERS",
    help="Static seed host:port (repeatable), where multicast is blocked.",
)
@click.option(
    "--memory",
    default=None,
    envvar="MESHSHARD_MEMORY",
    help="Memory offered to the mesh, e.g. 2GB (default: 80% of available).",
)
@click.option(
    "--objective",
    type=click.Choice(["latency", "throughput"]),
    default="latency",
    show_default=True,
    envvar="MESHSHARD_OBJECTIVE",
)
@click.option("--no-mdns", is_flag=True, envvar="MESHSHARD_NO_MDNS", help="Use only --peer seeds.")
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1, 256),
    envvar="MESHSHARD_THREADS",
    help="Compute threads (default: torch's). Use 1 when several peers share one machine.",
)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="MESHSHARD_SECRET_FILE",
    help="The mesh key file (from `meshshard keygen`), the same on every device.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="MESHSHARD_INSECURE",
    help="Run without a mesh key: anyone on the network can join and read. Not for real use.",
)
@click.option(
    "--mesh",
    "mesh_name",
    default="meshshard",
    show_default=True,
    envvar="MESHSHARD_MESH",
    help="Mesh name, bound into every sealed message.",
)
@click.option(
    "--api-port",
    default=None,
    type=click.IntRange(1, 65535),
    envvar="MESHSHARD_API_PORT",
    help="Port of the user API (OpenAI endpoints, status). Default: --port + 1000.",
)
@click.option(
    "--api-bind",
    default="127.0.0.1",
    show_default=True,
    envvar="MESHSHARD_API_BIND",
    help="Address of the user API; other than loopback only with --api-token.",
)
@api_token_option
@click.option(
    "--api-allow-host",
    "api_allow_hosts",
    multiple=True,
    envvar="MESHSHARD_API_ALLOW_HOSTS",
    help="A host name the API answers to besides loopback and its own address (repeatable).",
)
@click.option(
    "--max-frame",
    default="64MB",
    show_default=True,
    envvar="MESHSHARD_MAX_FRAME",
    help="Largest data-plane frame accepted (checked before it is read); the profile says it, "
    "and peers cut what they send here to fit.",
)
@click.option(
    "--raw-port",
    default=0,
    show_default=True,
    type=click.IntRange(-1, 65535),
    envvar="MESHSHARD_RAW_PORT",
    help="Port of the raw TCP links that carry decode steps (0: any free port, none with "
    "--announce; -1: none, WebSockets only).",
)
@click.option(
    "--profile-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="MESHSHARD_PROFILE_DIR",
    help="Where to keep this device's profile (default: in the cache folder).",
)
@click.option(
    "--timings",
    type=click.Choice(["lan", "test"]),
    default="lan",
    show_default=True,
    envvar="MESHSHARD_TIMINGS",
    help="Control-plane timeouts: LAN defaults, or shrunk for tests.",
)
@click.option(
    "--speculate",
    default=Config.speculate,
    show_default=True,
    type=click.IntRange(0, 16),
    envvar="MESHSHARD_SPECULATE",
    help="Most tokens an answer drafts per pass through the chain (0: off).",
)
@click.option(
    "--context",
    "context_tokens",
    default=Config.context_tokens,
    show_default=True,
    type=click.IntRange(16, 1_000_000),
    envvar="MESHSHARD_CONTEXT",
    help="Tokens of prompt and answer the plan keeps KV memory for (longer requests are "
    "refused). Give every peer the same.",
)
def up(
    config: Config,
    port: int,
    interface: str | None,
    announce: str | None,
    name: str | None,
    priority: int,
    peers: tuple[str, ...],
    memory: str | None,
    objective: str,
    no_mdns: bool,
    threads: int | None,
    secret_file: Path | None,
    insecure: bool,
    mesh_name: str,
    api_port: int | None,
    api_bind: str,
    api_token: str | None,
    api_allow_hosts: tuple[str, ...],
    max_frame: str,
    raw_port: int,
    profile_dir: Path | None,
    timings: str,
    speculate: int,
    context_tokens: int,
) -> None:
    """Run a peer in the foreground until Ctrl-C (which hands its work over and leaves)."""
    import asyncio
    import dataclasses
    import os
    import signal

    # Set before torch loads OpenMP: an idle peer must not spin on cores others are using.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)

    from meshshard.config import API_PORT_OFFSET, LAN_TIMINGS, TEST_TIMINGS
    from meshshard.daemon import Daemon
    from meshshard.wire.checks import loopback

    if api_token is None and not loopback(api_bind):
        raise MeshShardError(f"an API on {api_bind} (not loopback) needs --api-token")
    if api_port is None and port + API_PORT_OFFSET > 65535:
        raise MeshShardError(f"--port {port} leaves no default API port: give --api-port")
    frame_limit = _bytes_option(max_frame)

    config = dataclasses.replace(
        config,
        port=port,
        interface=interface,
        announce=_address_option("--announce", announce) if announce else None,
        name=name,
        priority=priority,
        peers=tuple(_address_option("--peer", p) for seed in peers for p in seed.split(",") if p),
        memory=_bytes_option(memory),
        context_tokens=context_tokens,
        objective=objective,
        mdns=not no_mdns,
        secret_file=secret_file,
        insecure=insecure,
        mesh=mesh_name,
        api_port=api_port,
        api_bind=api_bind,
        api_token=api_token,
        api_allow_hosts=tuple(h for hosts in api_allow_hosts for h in hosts.split(",") if h),
        max_frame_bytes=int(frame_limit or 0) or 64 * 1024 * 1024,
        raw_port=raw_port,
        profile_dir=profile_dir,
        timings=TEST_TIMINGS if timings == "test" else LAN_TIMINGS,
        speculate=speculate,
    )
    daemon = Daemon(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.request_stop)
        await daemon.run()

    asyncio.run(main())


@cli.command()
@peer_url_option
@api_token_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status object.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def status(peer: str, api_token: str | None, as_json: bool, watch: bool) -> None:
    """Members, coordinator, epoch and plan, as one peer sees them."""
    from meshshard.client import fetch_status
    from meshshard.status import render_status

    while True:
        data = fetch_status(peer, api_token)
        if as_json:
            click.echo(json.dumps(data, indent=1))
        else:
            if watch:
                click.clear()
            click.echo(render_status(data))
        if not watch:
            return
        time.sleep(1)


@cli.command()
@click.argument("prompt")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, 4096))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2))
@click.option("--seed", default=None, type=click.IntRange(0), help="Reproducible sampling.")
@click.option("--system", default=None, help="System message.")
@peer_url_option
@api_token_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer with timing and epoch.")
def ask(
    prompt: str,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    system: str | None,
    peer: str,
    api_token: str | None,
    as_json: bool,
) -> None:
    """Ask the mesh; the answer streams as it is generated."""
    from meshshard.client import ask as run

    def show(piece: str) -> None:
        if not as_json:
            click.echo(piece, nl=False)

    result = run(
        peer,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        system=system,
        on_text=show,
        token=api_token,
    )
    click.echo(json.dumps(result) if as_json else "")


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Write a new random mesh key to PATH (readable by you only). Copy the same file to
    every device of the mesh and start each with `meshshard up --secret-file PATH`."""
    from meshshard.security import key_id, new_key, write_key_file

    key = new_key()
    try:
        write_key_file(path, key)
    except FileExistsError:
        raise MeshShardError(f"{path} exists; a mesh key is never overwritten") from None
    except OSError as e:
        raise MeshShardError(f"cannot write {path}: {e.strerror}") from None
    click.echo(f"wrote mesh key {key_id(key).hex()} to {path}")


@cli.command()
@click.argument("question", default="What is the capital of France? Answer in one sentence.")
@click.option("--peers", default=3, show_default=True, type=click.IntRange(2, 8))
@click.option("--port", default=7700, show_default=True, type=click.IntRange(1024, 65000))
@click.option(
    "--memory",
    default="300MB",
    show_default=True,
    help="Memory each peer offers: too little for the whole model, so it must be split.",
)
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--keep", is_flag=True, help="Keep the mesh up after the answer (for the dashboard).")
def demo(question: str, peers: int, port: int, memory: str, max_tokens: int, keep: bool) -> None:
    """Bring up a local mesh on loopback, ask it a question, and shut it down."""
    from meshshard.demo import run_demo

    run_demo(question, peers, port, memory, max_tokens, keep)


@cli.command("plan")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--objective",
    type=click.Choice(["latency", "throughput"]),
    default="latency",
    show_default=True,
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "exact", "approx"]),
    default="auto",
    show_default=True,
    help="auto: exact unless the mesh is too large, then approximate with a stated bound.",
)
@click.option("--compare", is_flag=True, help="Both objectives and every baseline side by side.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan object of DESIGN.md.")
def plan_cmd(file: Path, objective: str, mode: str, compare: bool, as_json: bool) -> None:
    """Plan FILE (a JSON or TOML instance): which devices run which units."""
    from meshshard.planner import load_instance, solve
    from meshshard.planner.report import comparison, comparison_table, plan_table

    inst = load_instance(file)
    if compare:
        if as_json:
            rows = [
                {"method": name, "note": note}
                | (
                    {}
                    if cost is None
                    else {
                        "latency_ms": round(cost.latency_ms, 4),
                        "bottleneck_ms": round(cost.bottleneck_ms, 4),
                        "tokens_per_s": round(cost.tokens_per_s, 4),
                    }
                )
                for name, cost, note in comparison(inst)
            ]
            click.echo(json.dumps(rows, indent=1))
        else:
            click.echo(comparison_table(inst))
        return
    plan = solve(inst, objective, mode)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(plan.to_json()))
    else:
        click.echo(plan_table(inst, plan))


if __name__ == "__main__":
    main()
