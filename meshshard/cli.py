"""The `meshshard` command.

Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from meshshard import __version__
from meshshard.config import DEFAULT_MODEL, DTYPES, Config
from meshshard.errors import MeshShardError

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
def cli(log_level: str) -> None:
    """Run one LLM across several devices as a chain of layer shards."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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
        "--dtype",
        type=click.Choice(DTYPES),
        default="float32",
        envvar="MESHSHARD_DTYPE",
        show_default=True,
    )
    @functools.wraps(f)
    def wrapper(*args: Any, model: str, dtype: str, **kwargs: Any) -> Any:
        return f(*args, config=Config(model=model, dtype=dtype), **kwargs)

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
    chain = LocalChain.load(model_dir, cuts, config.dtype)
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
                    "tokens_per_s": round(len(tokens) / elapsed, 2) if elapsed else None,
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

    chain = LocalChain.load(resolve_model(config.model, config.cache_dir), (), config.dtype)
    result = profile(chain, context=context, repeats=repeats)
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
