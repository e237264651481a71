"""`edgemeta gallery export|import`: a store's classes in one portable, checksummed file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import typer

from edgemeta.cli.common import app, command_of, console
from edgemeta.runtime.gallery import CONFLICTS

gallery_app = typer.Typer(help="Move enrolled classes between devices: export a store to one file, import it elsewhere.",
                          no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")


@command_of(gallery_app, "export")
def gallery_export(
    store: Path = typer.Option(..., help="Enrollment store folder."),
    out: Path = typer.Option(..., help="Gallery file to write (.npz)."),
    with_images: bool = typer.Option(False, help="Carry the kept images too, so another model can re-embed them."),
):
    """Write the store's classes (labels, support embeddings, head, model sha) to one checksummed file."""
    from edgemeta.cli.common import writable_target
    from edgemeta.runtime.gallery import export_gallery
    writable_target(out, "--out", (store,), kind="gallery")
    header = export_gallery(store, out, images=with_images)
    shots = sum(c["shots"] for c in header["classes"])
    console.print(f"gallery written: {out} ({len(header['classes'])} class(es), {shots} shot(s)"
                  + (", with images" if with_images else "") + ")", markup=False)


@command_of(gallery_app, "import")
def gallery_import(
    gallery: Path = typer.Argument(..., help="A gallery file from `edgemeta gallery export`."),
    store: Path = typer.Option(..., help="Enrollment store folder (created if missing)."),
    bundle: Optional[Path] = typer.Option(None, help="The store's bundle: needed to re-embed a gallery made for another model."),
    replace: bool = typer.Option(False, "--replace", help="The store's classes become the gallery's (default: merge)."),
    on_conflict: str = typer.Option("error", click_type=click.Choice(CONFLICTS), help="A label in both."),
):
    """Apply a gallery to a store in one atomic save; a gallery for another model is re-embedded
    from its images with --bundle, or refused."""
    from edgemeta.runtime.gallery import import_gallery
    classifier = None
    if bundle is not None:
        from edgemeta.runtime import FewShotClassifier
        classifier = FewShotClassifier.load(bundle)
    state = import_gallery(gallery, store, replace_all=replace, on_conflict=on_conflict, classifier=classifier)
    console.print(f"{len(state.classes)} class(es) in {store}", markup=False)
