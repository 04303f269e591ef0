"""Where the bundled demo model is, in a checkout and in an installed wheel — one answer for every caller.

The files live in the repository's `Resources/` (`make demo-weights` writes them there). The wheel ships
that same folder's `demo_model.*` as the package `RadiogenomicGANLib.bundled_model` (setup.py maps the
package onto `Resources/`, so whatever model is there at build time is what ships), found here through
`importlib.resources`. A checkout has no such package, so the checkout's `Resources/` is the fallback.
Both files are checked against `demo_model.sha256` before use: a damaged install is named as such.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path

PACKAGE = "RadiogenomicGANLib.bundled_model"
STEM = "demo_model"
CHECKOUT_RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


class BundledModelError(ValueError):
    """The bundled demo model is missing or damaged; the message says what to do."""


def _packaged_folder() -> Path | None:
    """The installed package folder holding the model, when this is an installed wheel (else None)."""
    with contextlib.suppress(ModuleNotFoundError, TypeError, NotADirectoryError, FileNotFoundError):
        candidate = importlib.resources.files(PACKAGE) / f"{STEM}.safetensors"
        if candidate.is_file():
            return Path(str(candidate)).parent
    return None


def bundled_weights_path() -> Path:
    """Path of `demo_model.safetensors` (its `.json` beside it), installed package first, then the checkout.

    Returns the checkout path even when it does not exist, so a message can name where it is expected.
    """
    folder = _packaged_folder() or CHECKOUT_RESOURCES
    return folder / f"{STEM}.safetensors"


def verify_bundled(path: Path | None = None) -> Path:
    """The bundled model's path after checking it exists and matches `demo_model.sha256` (when listed)."""
    from RadiogenomicGANLib.atomic import file_sha256

    path = path or bundled_weights_path()
    if not path.is_file():
        raise BundledModelError(
            f"the bundled demo model {path} is not there: reinstall the package, or in a checkout run "
            "`make demo-weights`; or pass --weights FILE.safetensors")
    listing = path.with_name(f"{STEM}.sha256")
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            digest, name = parts[0], parts[1].lstrip("*")
            member = path.with_name(name)
            if not member.is_file() or file_sha256(member) != digest:
                raise BundledModelError(f"the bundled demo model file {member} is missing or damaged (its SHA-256 "
                                        f"differs from {listing.name}); reinstall the package")
    return path
