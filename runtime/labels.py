"""Class labels: the one form a label is stored in, and what an older store's labels become.

A label is text, Unicode NFC, stripped, 1–128 characters, without control characters, and never
the reserved "unknown" nor anything that reads as it. Stores written before these rules may hold
labels they refuse (decomposed "café", "UNKNOWN"); `migrate_label` gives each a form that is
addressable again, so an upgrade never strands a class that cannot be forgotten or a gallery
that cannot be imported.
"""
from __future__ import annotations

import unicodedata

from .errors import LabelError

UNKNOWN = "unknown"
MAX_LABEL_LENGTH = 128
RENAMED = " (class)"  # appended to an old label that reads as the reserved "unknown"

# Letters of other scripts that render like the Latin ones of "unknown" (Unicode confusables).
_LOOKALIKES = str.maketrans({"о": "o", "ο": "o", "օ": "o", "к": "k", "κ": "k", "ո": "n", "п": "n", "ս": "u",
                             "υ": "u", "ԝ": "w", "ѡ": "w", "ω": "w", "ɯ": "w"})


def check_label(label) -> str:
    """A class label as stored: text, Unicode NFC (one form for what prints the same), stripped,
    1–128 characters, no control characters (newline, NUL, ESC…), and neither the reserved
    "unknown" nor anything that reads as it (other case, width or script)."""
    if not isinstance(label, str):
        raise LabelError(f"class labels are text, not {type(label).__name__} ({label!r})")
    text = unicodedata.normalize("NFC", label).strip()
    if not text or unicodedata.normalize("NFKC", text).casefold().translate(_LOOKALIKES) == UNKNOWN:
        raise LabelError(f"{text!r} cannot be a class label" + (" (it reads as the reserved 'unknown')" if text else ""))
    if len(text) > MAX_LABEL_LENGTH:
        raise LabelError(f"class label {text[:40]!r}… is {len(text)} characters; the limit is {MAX_LABEL_LENGTH}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for ch in text):
        raise LabelError(f"class label {text!r} holds control or unassigned characters; use printable text")
    return text




def migrate_label(label: str) -> str:
    """An older store's label in today's form: NFC and stripped; one that reads as "unknown" gets
    RENAMED appended ("UNKNOWN" → "UNKNOWN (class)"). Anything else it cannot fix stays as it was
    (still addressable by its exact text)."""
    text = unicodedata.normalize("NFC", label).strip() or label
    try:
        return check_label(text)
    except LabelError:
        pass
    try:
        return check_label(text[:MAX_LABEL_LENGTH - len(RENAMED)] + RENAMED)
    except LabelError:
        return label
