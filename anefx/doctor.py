"""`anefx doctor`: what this machine has, and what it means for anefx."""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata


@dataclass
class Check:
    name: str
    value: str
    ok: bool
    note: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tested_torch() -> str | None:
    try:
        from coremltools import _deps

        return getattr(_deps, "_TORCH_MAX_VERSION", None)
    except Exception:  # noqa: BLE001 - doctor reports, never fails
        return None


def checks() -> list[Check]:
    from anefx.lower import _quiet_coremltools

    _quiet_coremltools()
    found = []
    for dist in ("anefx", "torch", "coremltools", "transformers"):
        v = _version(dist)
        found.append(Check(dist, v or "not installed", v is not None,
                           "" if v else f"install it: pip install {dist}"))
    found.append(_torch_tested_check())
    found.append(_coreai_check())
    mac = sys.platform == "darwin"
    found.append(Check("platform", f"{platform.system()} {platform.release()} ({platform.machine()})", True,
                       "macOS: compiled models run in CoreML" if mac else
                       "not macOS: anefx converts to CoreML here, but CoreML cannot run; a compiled model "
                       "runs a stand-in instead and says which in a one-time AnefxNotice"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    found.append(Check("chromium", browser or "not found", browser is not None,
                       "used by the tests of the HTML graph diff (headless screenshots)" if browser else
                       "optional: only the browser tests of `anefx diff --html` need it "
                       "(apt-get install chromium chromium-driver)"))
    return found


def _coreai_check() -> Check:
    """The Core AI target's converter (optional): anefx.compile(..., target="coreai")."""
    v = _version("coreai-torch")
    if v is None:
        return Check("coreai-torch", "not installed", True, "optional: target='coreai' (a Core AI .aimodel) needs "
                     "it: pip install 'anefx[coreai]'. The default Core ML target does not.")
    from anefx.lower.coreai import can_run_coreai

    return Check("coreai-torch", v, True, "target='coreai' converts here; the .aimodel runs "
                 + ("here in Core AI" if can_run_coreai() else "on macOS / iOS 27 only (not on this OS)"))


def _torch_tested_check() -> Check:
    torch_v, tested = _version("torch"), _tested_torch()
    if torch_v is None or tested is None:
        return Check("coremltools torch check", "unknown", True)
    newer = _as_tuple(torch_v) > _as_tuple(tested)
    note = (f'coremltools prints "Torch version {torch_v} has not been tested with coremltools" because '
            f"its newest tested torch is {tested}. anefx is tested on this pair (its test suite converts every "
            "model it ships on torch 2.13); the message is expected and harmless, anefx hides it."
            if newer else "this torch is one coremltools was tested with")
    return Check("coremltools torch check", f"tested up to torch {tested}", True, note)


def _as_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
