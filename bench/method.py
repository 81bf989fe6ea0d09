"""A method the caching benchmark runs: its row key, its family (what the goals compare) and how it is enabled."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from speca import SpeCaConfig

FAMILIES = {  # --only family names -> display names
    "reference": "no cache",
    "speca": "SpeCa",
    "fewer-steps": "fewer steps",
    "firstblockcache": "FirstBlockCache",
    "taylorseercache": "TaylorSeerCache",
    "magcache": "MagCache",
    "fastercache": "FasterCache",
    "pab": "PyramidAttentionBroadcast",
    "cache-dit": "cache-dit",
}


@dataclass
class Method:
    name: str
    family: str  # a FAMILIES key
    key: str  # what --only matches
    speca: SpeCaConfig | None = None
    steps: int | None = None  # fewer-steps baseline
    enable: Callable | None = None  # a peer's cache: pipeline -> None (diffusers: enables it on pipeline.transformer)
    disable: Callable | None = None  # pipeline -> None; default: `pipeline.transformer.disable_cache()`
    per_branch: bool = False  # run the diffusers hook under per_branch_state
    batch: int = 8
    ablation: str | None = None  # SpeCa: what this row changes, for the ablation table

    @property
    def kind(self) -> str:
        return {"reference": "reference", "speca": "speca", "fewer-steps": "baseline"}.get(self.family, "peer")


def select(methods: list[Method], only: str) -> list[Method]:
    """Methods whose key or family name matches one of the comma-separated shell patterns ("all": every one)."""
    patterns = ["*"] if only == "all" else [p.strip() for p in only.split(",") if p.strip()]
    return [m for m in methods if any(fnmatch.fnmatchcase(m.key, p) or fnmatch.fnmatchcase(m.family, p)
                                      for p in patterns)]
