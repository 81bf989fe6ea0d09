"""The bundled tiny HunyuanVideo: its worlds, scorers, builder (`build`) and trainer (`train`).

Where the committed models live, inside the package so a plain install carries them: the bundled
default (recipe v2) and the first bundled model (v1), which the v1 benchmark results were measured on.
Defined here, not in `build` (torch, diffusers), so that reading the bundled model's configs
(`pipeline.loading.read_model_info`, the Ray job's driver) imports neither.
"""

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "model"
V1_MODEL_DIR = Path(__file__).resolve().parent / "model_v1"
