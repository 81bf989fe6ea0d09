"""VBench in an environment of its own: what it needs, checked before any work, and how it runs.

vbench 0.1.5 pins `transformers==4.33.2` and `numpy<2`, which break diffusers, so it cannot share
the generation environment. The scoring stage creates a dedicated virtualenv once (default
`~/.cache/speca-video/vbench-env`, or `--vbench-env`), reuses it while its requirements are
unchanged, and runs `jobs/vbench_runner.py` there as a subprocess.

Offline clusters: build the environment where PyPI is reachable (or point pip at a wheelhouse
with `PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels`) with `python -m jobs.score --prepare-env
--vbench-env /shared/vbench-env`, ship that folder (same OS and Python) or bake it into the
image, and put the weights under `$VBENCH_CACHE_DIR`. vbench would otherwise try to download
missing weights in the middle of a run; `check_weights` refuses to start instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

VBENCH_VERSION = "0.1.5"
RUNNER = Path(__file__).resolve().parent / "vbench_runner.py"

# VBench's 16 dimensions in its own order (vbench.VBench.build_full_dimension_list).
DIMENSIONS = (
    "subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality", "object_class",
    "multiple_objects", "color", "spatial_relationship", "scene", "temporal_style", "overall_consistency",
    "human_action", "temporal_flickering", "motion_smoothness", "dynamic_degree", "appearance_style",
)
# Dimensions that need VBench's own prompt suite; vbench refuses them in custom_input mode.
CUSTOM_UNSUPPORTED = frozenset({"object_class", "multiple_objects", "scene", "appearance_style", "color",
                                "spatial_relationship"})

_HF = "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main"
_CLIP = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class WeightFile:
    """One file (or folder) a dimension reads from $VBENCH_CACHE_DIR, and where it comes from."""

    path: str
    source: str
    is_dir: bool = False


# What each dimension reads with vbench's local mode (vbench/utils.py init_submodules and the
# dimension modules), relative to $VBENCH_CACHE_DIR.
WEIGHTS: dict[str, tuple[WeightFile, ...]] = {
    "temporal_flickering": (),
    "subject_consistency": (
        WeightFile("dino_model/facebookresearch_dino_main", "git clone https://github.com/facebookresearch/dino",
                   is_dir=True),
        WeightFile("dino_model/dino_vitbase16_pretrain.pth",
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    ),
    "background_consistency": (
        WeightFile("clip_model/ViT-B-32.pt",
                   f"{_CLIP}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    ),
    "aesthetic_quality": (
        WeightFile("clip_model/ViT-L-14.pt",
                   f"{_CLIP}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
        WeightFile("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                   "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth"),
    ),
    "imaging_quality": (
        WeightFile("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                   "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
                   "musiq_spaq_ckpt-358bb6af.pth"),
    ),
    "motion_smoothness": (
        WeightFile("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),
    ),
    "dynamic_degree": (
        WeightFile("raft_model/models/raft-things.pth",
                   "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip (unzip into raft_model/)"),
    ),
    "human_action": (
        WeightFile("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                   f"{_HF}/l16_ptk710_ftk710_ftk400_f16_res224.pth"),
    ),
    "temporal_style": (WeightFile("ViCLIP/ViClip-InternVid-10M-FLT.pth", f"{_HF}/ViClip-InternVid-10M-FLT.pth"),),
    "overall_consistency": (
        WeightFile("ViCLIP/ViClip-InternVid-10M-FLT.pth", f"{_HF}/ViClip-InternVid-10M-FLT.pth"),
    ),
}


# LPIPS (pyiqa's v0.1 AlexNet, as the caching papers report it): the linear heads and torchvision's
# AlexNet, relative to $VBENCH_CACHE_DIR; TORCH_HOME points at lpips/ so torchvision finds the latter.
LPIPS_WEIGHTS = (
    WeightFile("lpips/LPIPS_v0.1_alex-df73285e.pth",
               "https://github.com/chaofengc/IQA-Toolbox-Python/releases/download/v0.1-weights/"
               "LPIPS_v0.1_alex-df73285e.pth"),
    WeightFile("lpips/hub/checkpoints/alexnet-owt-7be5be79.pth",
               "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
)


class VBenchSetupError(Exception):
    """The VBench stage cannot start: bad dimensions, missing weights, or no environment."""


def cache_dir() -> Path:
    """Where vbench reads weights from: $VBENCH_CACHE_DIR, else ~/.cache/vbench (vbench's default)."""
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def check_dimensions(dimensions: list[str]) -> None:
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        raise VBenchSetupError(f"--dimensions: unknown VBench dimension(s) {unknown}; "
                               f"known: {', '.join(DIMENSIONS)}")
    unsupported = sorted(set(dimensions) & CUSTOM_UNSUPPORTED)
    if unsupported:
        raise VBenchSetupError(
            f"--dimensions: {unsupported} need VBench's own prompt suite and are not supported by vbench for "
            "custom prompts (mode='custom_input'); drop them or generate VBench's standard prompts")


def _missing(root: Path, files: tuple[WeightFile, ...]) -> list[WeightFile]:
    return [w for w in files if not ((root / w.path).is_dir() if w.is_dir else (root / w.path).is_file())]


def missing_lpips_weights(root: Path | None = None) -> list[str]:
    """LPIPS files absent from the cache, as 'path <- source' lines (empty when provisioned)."""
    root = root or cache_dir()
    return [f"{root / w.path} <- {w.source}" for w in _missing(root, LPIPS_WEIGHTS)]


def check_weights(dimensions: list[str], root: Path | None = None) -> None:
    """Fail before any work when a dimension's weights are not in the cache, listing every file needed."""
    root = root or cache_dir()
    missing = [(d, w) for d in dimensions for w in _missing(root, WEIGHTS[d])]
    if missing:
        lines = [f"  {d}: {root / w.path}{'/' if w.is_dir else ''}  <- {w.source}" for d, w in missing]
        raise VBenchSetupError(
            f"VBench weights missing under $VBENCH_CACHE_DIR={root} (nothing was scored; vbench would try to "
            "download them mid-run). Provide these files, then rerun:\n" + "\n".join(lines))


def default_env_dir() -> Path:
    return Path(os.environ.get("SPECA_VBENCH_ENV") or Path.home() / ".cache" / "speca-video" / "vbench-env")


def requirements() -> list[str]:
    """What the environment holds: vbench plus a torch/torchvision pair that imports together.

    PyPI's torchvision does not import beside a CPU-only torch build, so the pair is pinned
    here rather than left to the resolver.
    """
    if platform.machine() in ("aarch64", "arm64"):
        torch_pair = ["torch==2.9.1", "torchvision==0.24.1"]
    else:
        torch_pair = ["torch==2.14.1", "torchvision==0.29.1"]
    # setuptools 81 dropped pkg_resources, which vbench's CLIP and pyiqa import.
    return [*torch_pair, f"vbench=={VBENCH_VERSION}", "setuptools<81"]


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def ensure_env(env: Path, log=print) -> Path:
    """Create (once) and return the interpreter of the VBench virtualenv at `env`.

    A marker file records the requirements it was built with; a different set rebuilds it. A
    file lock keeps two scoring runs on one machine from building it at the same time.
    """
    env = Path(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    marker = env / "speca-vbench.json"
    wanted = {"requirements": requirements(), "python": sys.version.split()[0]}
    with open(env.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and json.loads(marker.read_text()) == wanted and _python(env).exists():
            return _python(env)
        log(f"[jobs.score] building the VBench environment at {env} (once; pip install {' '.join(wanted['requirements'])})")
        started = time.time()
        if not _python(env).exists():
            subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        result = subprocess.run([str(_python(env)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                 *wanted["requirements"]], check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise VBenchSetupError(f"could not build the VBench environment at {env} (pip exit {result.returncode}); "
                                   f"on an offline cluster prepare it elsewhere (see `python -m jobs.score --help`).\n"
                                   f"{result.stderr[-3000:]}")
        marker.write_text(json.dumps(wanted))
        log(f"[jobs.score] VBench environment ready in {time.time() - started:.0f} s")
    return _python(env)


def run_vbench(python: Path, videos: Path, prompts: dict[str, str], dimensions: list[str], workdir: Path,
               device: str = "cpu", log=print) -> dict:
    """Score `videos` with vbench; returns vbench's result JSON ({dimension: [mean, per-video list]})."""
    workdir.mkdir(parents=True, exist_ok=True)
    prompt_file = workdir / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    out = workdir / "vbench"
    log(f"[jobs.score] vbench {VBENCH_VERSION}: {', '.join(dimensions)} on {len(prompts)} videos")
    _run(python, ["--videos", str(videos), "--prompts", str(prompt_file), "--dimensions", ",".join(dimensions),
                  "--output", str(out), "--device", device], "vbench", log=log)
    result = out / "run_eval_results.json"
    if not result.is_file():
        raise RuntimeError(f"vbench exited cleanly but wrote no {result}")
    return json.loads(result.read_text())


def run_lpips(python: Path, pairs: list[tuple[str, str, str]], workdir: Path, device: str = "cpu",
              log=print) -> dict[str, float]:
    """LPIPS per (id, video, reference video), per frame then averaged; weights must be provisioned."""
    workdir.mkdir(parents=True, exist_ok=True)
    pair_file = workdir / "lpips_pairs.json"
    pair_file.write_text(json.dumps(pairs))
    root = cache_dir()
    _run(python, ["--lpips-pairs", str(pair_file), "--lpips-weights", str(root / LPIPS_WEIGHTS[0].path),
                  "--output", str(workdir), "--device", device], "LPIPS", torch_home=root / "lpips", log=log)
    return json.loads((workdir / "lpips.json").read_text())


def _run(python: Path, args: list[str], what: str, torch_home: Path | None = None, log=print) -> None:
    """Run the runner in the VBench environment, echoing its output as progress."""
    env = {**os.environ, "VBENCH_CACHE_DIR": str(cache_dir()), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the generation environment's packages must not leak into vbench's
    if torch_home is not None:
        env["TORCH_HOME"] = str(torch_home)
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen([str(python), str(RUNNER), *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(f"[{what}] {line.rstrip()}")
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed in the VBench environment (exit {proc.returncode}):\n" + "\n".join(tail))
