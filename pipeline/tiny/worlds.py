"""Which procedural world a bundled-style model was trained on, and what evaluates it there.

A model folder names its world in `generation_config.json` (`"world": "v2"`; folders without
the key are v1). The benchmarks and the score stage ask here, so a model is never scored with
another world's prompts or scorer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from . import scorer, scorer_v2, world, world_v2


@dataclass(frozen=True)
class World:
    """A world's held-out prompts, renderer and weight-free scorer.

    `eval_set(n)` is the fixed evaluation set (clip i has seed `eval_seed_base + i`);
    `sample_eval(seed)` draws one more held-out clip (for calibration sets apart from it).
    """

    name: str
    eval_set: Callable[[int], list]
    sample_eval: Callable[[int], object]
    render: Callable[[object], np.ndarray]
    scorer: ModuleType
    held_out: Callable[[object], bool]  # does the clip use a (colour, shape) pair held out of training
    num_objects: Callable[[object], int] = lambda spec: 1
    rebound_prompt: Callable[[object], str] | None = None  # the prompt with attributes handed to other objects
    eval_seed_base: int = world.EVAL_SEED_BASE

    def score(self, frames: np.ndarray, prompt: str) -> dict[str, bool]:
        """Per-attribute verdicts; ValueError when the prompt is outside this world's grammar."""
        return self.scorer.score(frames, prompt)


WORLDS = {
    "v1": World("v1", world.eval_specs, lambda seed: world.sample_spec(seed, split="eval"), world.render, scorer,
                lambda s: (s.color, s.shape) in world.HELD_OUT_PAIRS),
    "v2": World("v2", world_v2.eval_scenes, lambda seed: world_v2.sample_scene(seed, split="eval"), world_v2.render,
                scorer_v2, lambda s: any((o.color, o.shape) in world_v2.HELD_OUT_PAIRS for o in s.objects),
                lambda s: len(s.objects), world_v2.rebound_prompt),
}


def world_of(model_dir: str | Path) -> World:
    """The world named in a model folder's generation_config.json (v1 when it names none)."""
    config = Path(model_dir) / "generation_config.json"
    name = json.loads(config.read_text()).get("world", "v1") if config.is_file() else "v1"
    if name not in WORLDS:
        raise ValueError(f"{config}: world {name!r} is not one of {sorted(WORLDS)}")
    return WORLDS[name]
