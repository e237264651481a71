"""Demo helper: lay out shipped drawings the way a user's photos would be, and score predictions.

    python scripts/demo_photos.py ZIP SUPPORT_DIR QUERY_DIR   # 6 Tagalog characters, 5 shots each
    python scripts/demo_photos.py --score predictions.json    # accuracy of `edgemeta predict --json`
"""
import json
import sys
import zipfile
from pathlib import Path

ALPHABET, CLASSES, SHOTS = "Tagalog", 6, 5  # Tagalog is a test alphabet: never seen in training


def layout(zip_path: str, support: Path, queries: Path) -> None:
    by = {}
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(z.namelist()):
            if f"/{ALPHABET}/" in name and name.endswith(".png"):
                by.setdefault(name.split("/")[-2], []).append(z.read(name))
    queries.mkdir(parents=True, exist_ok=True)
    for c in sorted(by)[:CLASSES]:
        (support / c).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(by[c][:SHOTS]):
            (support / c / f"{i}.png").write_bytes(img)
        for i, img in enumerate(by[c][SHOTS:]):
            (queries / f"{c}__{i}.png").write_bytes(img)
    print(f"{CLASSES} {ALPHABET} characters × {SHOTS} shots in {support}/<character>/, "
          f"{CLASSES * (20 - SHOTS)} held-out drawings in {queries}/")


def score(path: str) -> None:
    rows = json.loads(Path(path).read_text())
    right = sum(Path(r["image"]).name.split("__")[0] == r["label"] for r in rows)
    print(f"accuracy on held-out drawings: {right}/{len(rows)} = {100 * right / len(rows):.1f}% "
          f"({CLASSES}-way {SHOTS}-shot, alphabet never seen in training)")


if __name__ == "__main__":
    if sys.argv[1] == "--score":
        score(sys.argv[2])
    else:
        layout(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
