"""One rule for everything qrecover resumes or reuses: a quantization's finished layers, a recovery's
checkpoints, a recipe's stages, a comparison's stages. Saved progress records the settings it was
made with and is taken up again only by a run with the same settings."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import QRecoverError
from .utils import atomic_write_json


def digest(settings) -> str:
    """A fingerprint of settings (anything JSON can write, keys in any order)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _as_saved(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))  # what a round trip through the file gives


class StateFile:
    """A JSON file of progress that belongs to one set of settings: `{"settings": ..., **state}`,
    written atomically. `path` None keeps nothing (a run that cannot resume)."""

    def __init__(self, path, settings: dict, what: str):
        self.path = Path(path) if path else None
        self.settings = _as_saved(settings)
        self.what = what  # "an interrupted quantization", "stage 'recover' of a recipe", ...

    def read(self) -> dict | None:
        """The saved state, or None when there is none; a state saved with other settings is refused."""
        if self.path is None or not self.path.is_file():
            return None
        saved = json.loads(self.path.read_text())
        old = saved.pop("settings", None) or {}
        changed = sorted(k for k in old.keys() | self.settings.keys() if old.get(k) != self.settings.get(k))
        if changed:
            diff = "; ".join(f"{k}: saved {old.get(k)!r}, now {self.settings.get(k)!r}" for k in changed)
            raise QRecoverError(
                f"{self.path.parent} holds {self.what} made with other settings ({_shorten(diff)}); rerun with "
                f"the saved settings to resume it, or delete {self.path.parent} to start over"
            )
        return saved

    def write(self, state: dict) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"settings": self.settings, **state})


def _shorten(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."
