"""VBench's aggregate scores, exactly as VBench defines them (scripts/constant.py, cal_final_score.py).

Each dimension's mean is min/max normalised with VBench's constants and weighted; Quality and
Semantic are weighted means over their dimension lists; Total = (4 x Quality + 1 x Semantic) / 5.

Unlike VBench's script, which counts a missing dimension as 0, a run that did not score all 16
dimensions is reported as partial: the group scores are taken over the dimensions that ran,
named as such, and Total is only given when every dimension ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

NORMALIZE = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
DIM_WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in NORMALIZE}
QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency")
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


@dataclass
class Aggregate:
    normalized: dict[str, float]   # dimension -> normalised score (before its weight)
    quality: float | None          # over the quality dimensions that ran
    semantic: float | None         # over the semantic dimensions that ran
    total: float | None            # only when all 16 ran
    partial: bool
    ran: list[str]
    missing: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def normalize(dimension: str, value: float) -> float:
    lo, hi = NORMALIZE[dimension]
    return (value - lo) / (hi - lo)


def _group(normalized: dict[str, float], names: tuple[str, ...]) -> float | None:
    ran = [d for d in names if d in normalized]
    if not ran:
        return None
    return sum(normalized[d] * DIM_WEIGHT[d] for d in ran) / sum(DIM_WEIGHT[d] for d in ran)


def aggregate(means: dict[str, float]) -> Aggregate:
    """VBench aggregate of per-dimension means (raw vbench values, e.g. 0.97 for temporal flickering)."""
    unknown = set(means) - set(NORMALIZE)
    if unknown:
        raise ValueError(f"not VBench dimensions: {sorted(unknown)}")
    normalized = {d: normalize(d, v) for d, v in means.items()}
    quality, semantic = _group(normalized, QUALITY), _group(normalized, SEMANTIC)
    missing = [d for d in (*QUALITY, *SEMANTIC) if d not in means]
    total = None
    if not missing:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return Aggregate(normalized, quality, semantic, total, bool(missing),
                     [d for d in (*QUALITY, *SEMANTIC) if d in means], missing)
