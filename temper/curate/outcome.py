"""What the per-document steps of `temper curate` decide about one document, and its JSON form
(the resume records in output_dir/.work and the rows Ray tasks send back both use it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Outcome", "encode_outcome", "decode_outcome"]


@dataclass
class Outcome:
    rule: str | None  # the rule that drops the document (None: it passed every per-document rule)
    reason: str | None
    text: str  # what is written: the cleaned text, or what a rejected row shows
    normalized: str  # the text after normalisation (an exact duplicate's rejected row shows it)
    digest: bytes | None = None
    signature: np.ndarray | None = None
    lines: set[int] | None = None
    c4_edited: bool = False


def encode_outcome(done: Outcome | None) -> dict | None:
    """An outcome as JSON (the signature travels apart, as bytes: `done.signature.tobytes()`)."""
    if done is None:
        return None
    return {"rule": done.rule, "reason": done.reason, "text": done.text,
            "normalized": None if done.normalized == done.text else done.normalized,
            "digest": None if done.digest is None else done.digest.hex(),
            "lines": None if done.lines is None else sorted(done.lines), "c4": done.c4_edited,
            "sig": done.signature is not None}


def decode_outcome(o: dict | None, signature: bytes | None) -> Outcome | None:
    """The inverse of `encode_outcome`, given the signature's bytes."""
    if o is None:
        return None
    return Outcome(o["rule"], o["reason"], o["text"], o["text"] if o["normalized"] is None else o["normalized"],
                   None if o["digest"] is None else bytes.fromhex(o["digest"]),
                   None if signature is None else np.frombuffer(signature, dtype=np.uint64).copy(),
                   None if o["lines"] is None else set(o["lines"]), o["c4"])
