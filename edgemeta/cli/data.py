"""`edgemeta data list|fetch|verify|path`: the datasets the configs name, fetched and checked."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import typer

from edgemeta.cli.common import RichProgress, app, command_of, console, err_console
from edgemeta.data.catalog import CATALOG

data_app = typer.Typer(help="Datasets by name: list them, fetch (resumable, verified), verify, print their paths.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
ROOT_HELP = "Data root (default: EDGEMETA_DATA, else ~/.cache/edgemeta/data)."


def _root(root: Optional[Path]) -> Path:
    from edgemeta.data.catalog import default_root
    return root.expanduser() if root is not None else default_root()


@command_of(data_app, "list")
def data_list(root: Optional[Path] = typer.Option(None, help=ROOT_HELP)):
    """The datasets edgemeta knows, their parts (what a config names) and whether they are here."""
    from rich.table import Table

    from edgemeta.data.catalog import CATALOG
    base = _root(root)
    table = Table("dataset", "parts (config name → file under the root)", "here", "license", box=None)
    for d in CATALOG.values():
        parts = "\n".join(f"{d.name}:{p} → {rel}" for p, rel in d.parts.items())
        here = "\n".join("yes" if (base / rel).is_file() else "no" for rel in d.parts.values())
        table.add_row(d.name, parts, here, d.license + ("\n(needs --accept-terms)" if d.terms else ""))
    console.print(table)
    console.print(f"data root: {base}", markup=False)


@command_of(data_app, "fetch")
def data_fetch(
    name: str = typer.Argument(..., click_type=click.Choice(tuple(CATALOG)), help="The dataset."),
    root: Optional[Path] = typer.Option(None, help=ROOT_HELP),
    from_file: Optional[list[Path]] = typer.Option(None, "--from", help="Use this file you downloaded yourself (verified first); repeatable."),
    mirror: Optional[list[str]] = typer.Option(None, help="Base URL holding the files under their official names, tried first; repeatable (also EDGEMETA_DATA_MIRRORS)."),
    accept_terms: bool = typer.Option(False, "--accept-terms", help="Accept the dataset's terms of use (Tiny ImageNet)."),
    timeout: float = typer.Option(30.0, help="Seconds without data before a download attempt fails."),
):
    """Download a dataset's official files (resuming a partial download), verify their checksums,
    and build the files configs read. Already-verified files are not downloaded again."""
    from edgemeta.data.fetch import fetch, mirrors_from_env
    parts = fetch(name, _root(root), mirrors=tuple(mirror or ()) + mirrors_from_env(), from_files=tuple(from_file or ()),
                  accept_terms=accept_terms, progress=RichProgress(err_console.is_terminal), timeout=timeout)
    for part, path in parts.items():
        console.print(f"{name}:{part} → {path}", markup=False)


@command_of(data_app, "verify")
def data_verify(name: str = typer.Argument(..., click_type=click.Choice(tuple(CATALOG)), help="The dataset."),
                root: Optional[Path] = typer.Option(None, help=ROOT_HELP)):
    """Check every file of a fetched dataset against its pinned checksums and the sha256 recorded when it was fetched."""
    from edgemeta.data.catalog import parse_name
    from edgemeta.data.fetch import verify
    from edgemeta.runtime.errors import DataError
    dataset, _ = parse_name(name)
    problems = verify(dataset.name, _root(root))
    if problems:
        raise DataError(f"{dataset.name}: " + "; ".join(problems))
    console.print(f"{dataset.name}: every file matches", markup=False)


@command_of(data_app, "path")
def data_path(name: str = typer.Argument(..., help="A dataset or dataset:part, e.g. omniglot:evaluation"),
              root: Optional[Path] = typer.Option(None, help=ROOT_HELP)):
    """Print where a dataset's part lives (what a config's `data = ["NAME:PART"]` reads)."""
    from edgemeta.data.catalog import parse_name
    from edgemeta.runtime.errors import DataError
    dataset, part = parse_name(name)
    path = dataset.part_path(_root(root), part)
    if not path.is_file():
        raise DataError(f"{path} is not there yet: run edgemeta data fetch {dataset.name}")
    print(path)
