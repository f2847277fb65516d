"""A content-addressed store for what attacks train before a victim (an ISSBA encoder, a
clean-label surrogate): built once per identity, found again from any node, like a victim.

Layout: ``<root>/<kind>-<key>/tensors.safetensors`` and ``artifact.json`` (identity, sha256 of
the tensors). Entries are written to a temporary folder and renamed into place, so an entry is
complete or absent; one that fails its hash check is rebuilt. Only safetensors are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdx_study._io import sha256_file, sha256_json

if TYPE_CHECKING:
    from torch import Tensor


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def entry(self, kind: str, identity: dict[str, Any]) -> Path:
        return self.root / f"{kind}-{sha256_json({'kind': kind, **identity})[:16]}"

    def load(self, kind: str, identity: dict[str, Any]) -> dict[str, Tensor] | None:
        folder = self.entry(kind, identity)
        meta, tensors = folder / "artifact.json", folder / "tensors.safetensors"
        if not meta.is_file() or not tensors.is_file():
            return None
        if sha256_file(tensors) != json.loads(meta.read_text()).get("sha256"):
            return None
        from safetensors.torch import load_file  # torch: only once an attack trains

        return load_file(tensors)

    def get_or_build(
        self, kind: str, identity: dict[str, Any], build: Callable[[], dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], bool]:
        """(tensors, built_now): the stored entry, or ``build()`` stored and read back (a
        concurrent writer's valid entry wins, so every user sees the same tensors)."""
        found = self.load(kind, identity)
        if found is not None:
            return found, False
        tensors = build()
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.", dir=self.root))
        tmp.chmod(0o755)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        meta = {"kind": kind, "identity": identity, "sha256": sha256_file(tmp / "tensors.safetensors")}
        (tmp / "artifact.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        final = self.entry(kind, identity)
        if final.exists() and self.load(kind, identity) is None:  # corrupted: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process stored a valid entry meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        stored = self.load(kind, identity)
        if stored is None:
            raise RuntimeError(f"attack artifact {final} could not be written")
        return stored, True
