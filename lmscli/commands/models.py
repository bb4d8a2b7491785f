"""Model commands: load, unload, ps, ls, import, get."""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lmscli import completion
from lmscli.client import EXIT_USAGE, CliError, CtrlC, boundary, connect, models_dir
from lmscli.durations import ttl_callback
from lmscli.output import (
    clean,
    err,
    format_duration,
    info,
    instance_json,
    model_json,
    print_instances,
    print_json,
    print_models,
    stderr,
    stdout,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _positive(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter("must be a positive number of tokens")
    return value


@boundary
def load(
    model: Annotated[str, typer.Argument(help="Model key, a prefix of one, or a path inside the models folder.",
                                         autocompletion=completion.model_keys)],
    ttl: Annotated[
        str | None, typer.Option("--ttl", callback=ttl_callback, help="Unload after this long idle: 3600, 90s, 5m, 1h.")
    ] = None,
    identifier: Annotated[str | None, typer.Option("--identifier", help="Name to use for this instance.")] = None,
    context_length: Annotated[
        int | None, typer.Option("--context-length", "-c", callback=_positive, help="Context length in tokens.")
    ] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", min=1, max=64,
                                 help="Requests it decodes together (default: the default_parallel setting, 4).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Take the best match without asking.")] = False,
    estimate_only: Annotated[
        bool, typer.Option("--estimate-only", help="Print the memory the load would take and whether it fits.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Load a model; prints the identifier to use with the API."""
    from lmsd.api.v1 import control_pb2 as pb

    client = connect()
    listing = client.stub.ListModels(pb.ListModelsRequest(), timeout=60)
    key = _choose_model(model, [m.key for m in listing.models], yes, listing.models_dir)
    request = pb.LoadRequest(model=key, identifier=identifier or "", context_length=context_length or 0,
                             parallel=parallel or 0)
    if estimate_only:
        request.estimate_only = True
        _print_estimate(next(iter(client.stub.Load(request, timeout=60))).estimate, as_json)
        return
    if ttl is not None:
        request.ttl_seconds = int(ttl)
    instance = None
    import grpc
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("Loading {task.fields[model]}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), console=stderr.console, transient=True,
                  disable=not stderr.is_terminal) as bar, CtrlC() as ctrl_c:
        task = bar.add_task("load", total=1.0, model=key)
        try:
            for event in ctrl_c.watch(client.stub.Load(request)):
                if event.HasField("progress"):
                    bar.update(task, completed=event.progress.fraction)
                else:
                    instance = event.instance
        except grpc.RpcError:
            if not ctrl_c.pressed:
                raise
    if ctrl_c.pressed:  # the call was cancelled: the daemon withdraws the load
        raise KeyboardInterrupt
    if instance is None:
        raise CliError(f"the daemon ended the load of {key} without an answer")
    ttl_text = f", idle TTL {format_duration(int(ttl))}" if ttl else ""
    if context_length and instance.context_length != context_length:
        err(f"--context-length {context_length} became {instance.context_length}: llama.cpp sizes the context in "
            "steps of 256 tokens")
    err(f"Loaded {instance.model} as '{instance.identifier}' (context {instance.context_length}{ttl_text}). "
        f"Use the identifier '{instance.identifier}' in API requests.")
    if as_json:
        print_json(instance_json(instance))
    else:
        stdout.print(clean(instance.identifier), markup=False, highlight=False)


def _print_estimate(est: object, as_json: bool) -> None:
    from lmscli.output import estimate_json, format_bytes

    data = estimate_json(est)
    if as_json:
        print_json(data)
    else:
        budget = format_bytes(data["budget_bytes"]) if data["budget_bytes"] is not None else "no budget"
        stdout.print(clean(f"{data['model']} at context {data['context_length']}: about "
                     f"{format_bytes(data['estimated_memory_bytes'])} (budget {budget}, "
                     f"{format_bytes(data['available_bytes'])} available): "
                     f"{'fits' if data['fits'] else 'does not fit'}"), markup=False, highlight=False)
    detail = getattr(est, "detail", "")
    if detail:
        err(detail)
    if not data["fits"]:
        raise typer.Exit(1)


def _choose_model(query: str, keys: list[str], yes: bool, models_dir: str) -> str:
    """The key the user means; asks when it is ambiguous and nobody said -y."""
    from lmsd.matching import is_unique_match, rank_matches

    if "/" in query:
        return query  # a path inside the models folder (with or without .gguf): the daemon resolves and polices it
    ranked = rank_matches(query, keys)
    if not ranked:
        raise CliError(f"no model matches '{query}' in {models_dir}. See `lms ls`, or fetch one with `lms get`.")
    if is_unique_match(query, keys) or yes:
        return ranked[0]
    if len(ranked) == 1:  # a near miss (a typo): one suggestion, not a choice between several
        raise CliError(f"no model '{query}' in {models_dir}. Did you mean {ranked[0]}? (-y takes it)")
    if not sys.stdin.isatty():
        raise CliError(
            f"'{query}' is ambiguous; it could be: {', '.join(ranked[:8])}. "
            "Name one exactly, or pass -y to take the first.",
            EXIT_USAGE,
        )
    from rich.prompt import IntPrompt

    err(f"'{query}' matches several models:")
    for n, key in enumerate(ranked[:9], 1):
        err(f"  {n}. {key}")
    choice = IntPrompt.ask("Load which one", console=stderr.console,
                           choices=[str(n) for n in range(1, len(ranked[:9]) + 1)], default=1)
    return ranked[choice - 1]


@boundary
def unload(
    identifier: Annotated[str | None, typer.Argument(help="Identifier from `lms ps`.",
                                                     autocompletion=completion.loaded_identifiers)] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Unload every loaded model.")] = False,
    grace: Annotated[
        float, typer.Option("--grace", min=0, help="Seconds running requests may take to finish before they end.")
    ] = 10.0,
) -> None:
    """Unload a model (running requests finish first, up to --grace seconds)."""
    from lmsd.api.v1 import control_pb2 as pb

    if identifier and all_:
        raise CliError("give an identifier or --all, not both", EXIT_USAGE)
    client = connect()
    if identifier and not all_:
        identifier = _loaded_identifier(client, identifier)
    if not identifier and not all_:
        loaded = [i.identifier for i in client.stub.ListLoaded(pb.ListLoadedRequest(), timeout=10).instances]
        if not loaded:
            info("No models are loaded.")
            return
        if len(loaded) > 1 or not sys.stdin.isatty():
            raise CliError(f"which one? Loaded: {', '.join(loaded)}. Give an identifier, or --all.", EXIT_USAGE)
        identifier = loaded[0]
    response = client.stub.Unload(pb.UnloadRequest(identifier=identifier or "", all=all_, grace_seconds=grace),
                                  timeout=grace + 60)
    if not response.identifiers:
        info("No models are loaded.")
    for ident in response.identifiers:
        err(f"Unloaded '{ident}'")


def _loaded_identifier(client: Any, query: str) -> str:
    """The loaded instance `query` names: its identifier, or a unique prefix of one (as `lms load` takes keys)."""
    from lmsd.api.v1 import control_pb2 as pb
    from lmsd.matching import is_unique_match, rank_matches

    loaded = [i.identifier for i in client.stub.ListLoaded(pb.ListLoadedRequest(), timeout=10).instances]
    if query in loaded or not loaded:
        return query  # the daemon answers for an unknown one, naming what is loaded
    ranked = rank_matches(query, loaded)
    if is_unique_match(query, loaded):
        return ranked[0]
    prefixed = [i for i in ranked if i.lower().startswith(query.lower())]
    if len(prefixed) > 1:
        raise CliError(f"'{query}' matches several loaded instances: {', '.join(prefixed)}; name one exactly, "
                       "or use --all", EXIT_USAGE)
    return query


@boundary
def ps(as_json: JsonOpt = False) -> None:
    """List loaded models with their status, memory and idle TTL."""
    from lmsd.api.v1 import control_pb2 as pb

    response = connect().stub.ListLoaded(pb.ListLoadedRequest(), timeout=10)
    instances = list(response.instances)
    if as_json:
        print_json([instance_json(i) for i in instances])
    else:
        print_instances(instances, response.memory)


@boundary
def ls(
    as_json: JsonOpt = False,
    llm: Annotated[bool, typer.Option("--llm", help="Language models only.")] = False,
    embedding: Annotated[bool, typer.Option("--embedding", help="Embedding models only.")] = False,
) -> None:
    """List downloaded models (GGUF files under the models folder)."""
    from lmsd.api.v1 import control_pb2 as pb

    listing = connect().stub.ListModels(pb.ListModelsRequest(), timeout=120)
    kinds = {k for k, on in (("llm", llm), ("embedding", embedding)) if on} or {"llm", "embedding"}
    models = [m for m in listing.models if (m.type if m.type == "embedding" else "llm") in kinds]
    if as_json:
        print_json([model_json(m) for m in models])
    else:
        print_models(models, listing.models_dir)


@boundary
def import_(
    path: Annotated[Path, typer.Argument(help="A .gguf file to add to the models folder.")],
    mode: Annotated[str, typer.Option("--mode", help="copy, move, or link (symlink).")] = "copy",
    user_repo: Annotated[
        str | None, typer.Option("--user-repo", help="Place it at <publisher>/<repo>/ in the models folder.")
    ] = None,
) -> None:
    """Add a GGUF file to the models folder."""
    from lmscli.fetch import import_model

    if mode not in ("copy", "move", "link"):
        raise CliError(f"--mode must be copy, move or link, not '{mode}'", EXIT_USAGE)
    dest = import_model(path, mode=mode, user_repo=user_repo)
    err(f"Imported {path.name} to {dest}")
    stdout.print(str(dest), markup=False)


@boundary
def get(
    name: Annotated[str, typer.Argument(help="smollm2 (the default model), or from Hugging Face: OWNER/REPO, "
                                             "OWNER/REPO@Q8_0 or OWNER/REPO/FILE.gguf.")],
    select: Annotated[bool, typer.Option("--select", help="Choose the file from the repo's list (on a terminal).")]
    = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Take the default file without asking: Q4_K_M, else the "
                                                          "quantization closest to it.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be downloaded and its size; fetch "
                                                            "nothing.")] = False,
    gguf: Annotated[bool, typer.Option("--gguf", help="GGUF files (the only format lms runs; the default).")] = True,
    mlx: Annotated[bool, typer.Option("--mlx", hidden=True)] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a model into the models folder: the default model, or a GGUF from Hugging Face."""
    from lmscli.hub import is_hub_name

    if mlx:
        raise CliError("lms runs GGUF models only (llama.cpp); MLX models are for Apple's MLX runtime", EXIT_USAGE)
    if not is_hub_name(name):
        from lmscli.fetch import fetch_model

        if dry_run:
            raise CliError("--dry-run is for Hugging Face repos (OWNER/REPO)", EXIT_USAGE)
        dest = fetch_model(name)
        if as_json:
            print_json({"files": [{"path": str(dest), "size": dest.stat().st_size}]})
        else:
            stdout.print(str(dest), markup=False)
        return
    from lmscli.hub import fetch
    from lmsd.memory import format_bytes

    result = fetch(name, select=select and not yes, dry_run=dry_run, models_dir=models_dir())
    # The name that loads this very file: its path in the models folder. Its key may be a longer one (another file
    # of the same name was there first and keeps the short key).
    result["model"] = f"{result['repo']}/{result['label'].removesuffix('.gguf')}"
    if as_json:
        print_json(result)
    elif dry_run:
        for f in result["files"]:
            state = "already there" if f["present"] else "to download"
            stdout.print(f"{f['path']}\t{format_bytes(f['size'])}\t{state}", markup=False)
        err(f"{result['label']}: {format_bytes(result['download_bytes'])} to download, "
            f"{format_bytes(result['free_bytes'])} free")
    else:
        for f in result["files"]:
            stdout.print(f["path"], markup=False)
        err(f"{result['model']} is ready: load it with `lms load {result['model']}`")
    if dry_run and not result["fits"]:
        raise CliError(f"not enough disk space: {format_bytes(result['download_bytes'])} to download, "
                       f"{format_bytes(result['free_bytes'])} free")


def register(app: typer.Typer) -> None:
    app.command("load")(load)
    app.command("unload")(unload)
    app.command("ps")(ps)
    app.command("ls")(ls)
    app.command("import")(import_)
    app.command("get")(get)
