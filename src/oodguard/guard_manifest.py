"""Integrity of a saved guard folder: one seal over every file's checksum and every setting, optionally signed.

``guard.json`` holds the settings of a guard (decision rule, detector, model description, input contract), a
sha256 checksum of every other file, and a ``seal``: the sha256 of all of that in canonical JSON or, with a
signing key, its HMAC-SHA256 (RFC 2104). Without a key the seal catches damage and hand edits; anyone who can
write the folder can recompute it. With a key (:data:`KEY_ENV`), only a holder of the key can.

A copy of the settings also travels inside ``calibration.safetensors`` (its header, covered by that file's own
digest), so that when the seal does not match, the error can name the setting that was edited.

Nothing here imports or runs code named in the folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from oodguard.extraction.fingerprint import tensor_bytes
from oodguard.persist import sha256_of_file

__all__ = [
    "KEY_ENV",
    "DECISION_LOG_FILES",
    "signing_key",
    "seal",
    "check_seal",
    "setting_differences",
    "check_folder_contents",
    "verified_file",
    "architecture",
    "architecture_digest",
    "weights_digest",
]

#: Environment variable holding the key that signs saved guards and is required to load them.
KEY_ENV = "OODGUARD_GUARD_KEY"
_MIN_KEY_BYTES = 16
#: Files the service may write into a guard folder (its default decision log); never read by ``load_guard``.
DECISION_LOG_FILES = frozenset(f"decisions.sqlite{suffix}" for suffix in ("", "-wal", "-shm", "-journal"))


def signing_key(key: str | bytes | None) -> bytes | None:
    """The signing key: ``key`` if given, else the environment variable :data:`KEY_ENV`; ``None`` when neither."""
    source = "key"
    if key is None:
        key, source = os.environ.get(KEY_ENV), KEY_ENV
        if key is None:
            return None
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < _MIN_KEY_BYTES:
        raise ValueError(
            f"{source}: a signing key needs at least {_MIN_KEY_BYTES} bytes (got {len(raw)}); make one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return raw


def _canonical(settings: Mapping[str, Any]) -> bytes:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def seal(settings: Mapping[str, Any], key: bytes | None) -> dict[str, str]:
    """The seal of ``settings``: ``{"algorithm": "sha256" | "hmac-sha256", "value": hex digest}``."""
    if key is None:
        return {"algorithm": "sha256", "value": hashlib.sha256(_canonical(settings)).hexdigest()}
    return {"algorithm": "hmac-sha256", "value": hmac.new(key, _canonical(settings), hashlib.sha256).hexdigest()}


def setting_differences(found: Any, saved: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two JSON values (``decision.alpha``, ``model``, ...)."""
    if isinstance(found, dict) and isinstance(saved, dict):
        names = []
        for key in sorted(set(found) | set(saved)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in found or key not in saved:
                names.append(name)
            else:
                names.extend(setting_differences(found[key], saved[key], name))
        return names
    return [] if _canonical({"v": found}) == _canonical({"v": saved}) else [prefix or "(all settings)"]


def check_seal(
    config_path: Path,
    settings: Mapping[str, Any],
    recorded: Any,
    key: bytes | None,
    saved_settings: Callable[[], Mapping[str, Any] | None],
) -> None:
    """Refuse ``settings`` whose seal does not match, naming the edited settings when the saved copy tells them
    (``saved_settings`` reads that copy; it is called only when the seal does not match)."""
    if not isinstance(recorded, dict) or set(recorded) != {"algorithm", "value"}:
        raise ValueError(f"{config_path}: field 'seal' is missing or damaged; save the guard again")
    algorithm = recorded["algorithm"]
    if algorithm == "hmac-sha256" and key is None:
        raise ValueError(
            f"{config_path}: field 'seal': the guard is signed; set {KEY_ENV} (or pass key=) to the key it was signed "
            "with, so that its signature can be checked"
        )
    if algorithm == "sha256" and key is not None:
        raise ValueError(
            f"{config_path}: field 'seal': the guard is not signed but a signing key is set ({KEY_ENV} or key=); an "
            "unsigned guard could have been written by anyone. Save it again with the key set"
        )
    if algorithm not in ("sha256", "hmac-sha256"):
        raise ValueError(f"{config_path}: field 'seal.algorithm' is {algorithm!r}, expected 'sha256' or 'hmac-sha256'")
    if hmac.compare_digest(str(recorded["value"]), seal(settings, key)["value"]):
        return
    saved = saved_settings()
    changed = [] if saved is None else setting_differences(dict(settings), dict(saved))
    changed = [name for name in changed if name != "files" and not name.startswith("files.")]
    if changed:
        details = "; ".join(_describe(name, settings, saved) for name in changed[:4])
        raise ValueError(
            f"{config_path}: field {changed[0]!r} was edited after the guard was saved ({details}); refusing to load. "
            "Restore the folder or save the guard again"
        )
    what = "signature" if key is not None else "seal"
    hint = " or was signed with another key" if key is not None else ""
    raise ValueError(
        f"{config_path}: field 'seal': the {what} does not match the file checksums and settings: the folder was "
        f"modified after saving{hint}; refusing to load. Restore the folder or save the guard again"
    )


def _lookup(settings: Mapping[str, Any] | None, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "(absent)"
        value = value[part]
    return value


def _describe(name: str, found: Mapping[str, Any], saved: Mapping[str, Any] | None) -> str:
    return f"{name} is {_lookup(found, name)!r}, saved as {_lookup(saved, name)!r}"


def check_folder_contents(directory: Path, listed: set[str], config_name: str) -> None:
    """Refuse files, links and folders the guard does not list (its decision log excepted)."""
    unexpected = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink():
            unexpected.append(f"{relative} (a symbolic link)")
        elif path.is_file():
            if relative not in listed and relative != config_name and relative not in DECISION_LOG_FILES:
                unexpected.append(relative)
        elif path.is_dir() and not any(name.startswith(f"{relative}/") for name in listed):
            unexpected.append(f"{relative}/ (a folder)")
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise ValueError(
            f"{directory}: holds files the guard does not list: {shown}. A guard folder holds only {config_name}, the "
            "files it lists and the service's decisions.sqlite; remove the others (nothing in the folder is ever "
            "run, but unexpected files mean it was not written by Guard.save)"
        )


def verified_file(directory: Path, files: Mapping[str, Any], relative: str, config_path: Path) -> Path:
    """The path of a listed file after checking it lies inside ``directory`` and matches its checksum."""
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ValueError(f"{config_path}: file {relative!r} lies outside the guard directory; refusing")
    expected = files.get(relative)
    if not isinstance(expected, str):
        raise ValueError(f"{config_path}: field 'files': no checksum recorded for {relative!r}; the guard is damaged")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the saved guard")
    actual = sha256_of_file(path)
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 checksum mismatch (recorded {expected[:12]}..., file has {actual[:12]}...); the file "
            "was modified or damaged after saving. Refusing to load it; save the guard again"
        )
    return path


# ---------------------------------------------------------------------------------------------- the model
def architecture(model: torch.nn.Module) -> list[str]:
    """The model's structure as lines: every submodule's name and class, every state entry's name, dtype, shape."""
    lines = [f"module {name or '(root)'}: {type(module).__name__}" for name, module in model.named_modules()]
    lines += [
        f"state {name}: {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
        for name, tensor in model.state_dict().items()
    ]
    return lines


def architecture_digest(model: torch.nn.Module) -> str:
    return hashlib.sha256("\n".join(architecture(model)).encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every state entry's name and bytes, in the state dict's order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + b"\0")
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()
