"""`temper.json` beside a model directory's weights: where the model came from.

It records the stage that wrote the model, its parent, the built-in world it saw (if any),
the pretraining token shards (whose validation split later stages use to watch for
forgetting), and the chat template the model was fine-tuned with, so that a later load
with a different template can warn: a template mismatch makes a good model look broken.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from temper.io import atomic_write_text

FILE = "temper.json"


def read_lineage(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        warnings.warn(f"{path}: unreadable lineage file ignored", stacklevel=2)
        return {}


def write_lineage(model_dir: str | Path, data: dict[str, Any]) -> None:
    atomic_write_text(Path(model_dir) / FILE, json.dumps(data, indent=2, default=str) + "\n")


def check_template(model_dir: str | Path, template: str | None) -> bool:
    """Warn when `template` differs from the one the model was fine-tuned with; True if it matches."""
    trained = read_lineage(model_dir).get("chat_template_trained")
    if trained is None or template == trained:
        return True
    warnings.warn(
        f"{model_dir}: this chat template differs from the one the model was fine-tuned with; "
        "expect worse answers (use the model's own template)", stacklevel=2,
    )
    return False
