"""The Ray job's driver and its manifest stage run without torch or diffusers.

Importing them costs seconds and hundreds of MB before Ray starts (the 10^6-row bar in
bench/results/scale_replicas.md). Each check runs in a fresh interpreter: this one has them loaded.
"""

import json
import subprocess
import sys
from pathlib import Path

import jobs

HEAVY = ("torch", "diffusers", "transformers")

DRIVER = """
import json, sys
import jobs.generate, jobs.manifest, jobs.replica, jobs.score
from jobs.generate import _parallel_for, build_parser, model_config_from_args, speca_config_from_args
from jobs.manifest import ResolveStage, manifest_files, read_and_check
from pipeline.config import with_token_budget
from pipeline.loading import read_model_info
from speca.config import SpeCaConfig

args = build_parser().parse_args(["--manifest", sys.argv[1], "--output", sys.argv[2]])
model, speca = model_config_from_args(args), speca_config_from_args(args)
assert isinstance(speca, SpeCaConfig)
info = read_model_info(model.model)
_parallel_for(args, info)
limits = with_token_budget(info.limits, info.defaults)
files = manifest_files(args.manifest)
stage = ResolveStage(args.output, None, False)
rows = [row for unit in files.units
        for batch in read_and_check({k: [v] for k, v in unit.items()}, files.storage.fs, info, limits, 8)
        for row in stage(batch).to_pylist()]
assert rows, "the example manifest gave no rows"
print(json.dumps(sorted(m for m in %r if m in sys.modules)))
""" % (HEAVY,)


def _run(code: str, *argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_driver_and_manifest_stage_import_no_torch_or_diffusers(tmp_path):
    manifest = Path(jobs.__file__).parent / "data" / "example_prompts.parquet"
    assert json.loads(_run(DRIVER, str(manifest), str(tmp_path / "out"))) == []


def test_lazy_packages_still_export_their_names_and_register_every_family():
    """`speca` and `pipeline.parallel` load their names on first use; a family module imported on its own
    first still leaves every family registered, in the package's order."""
    code = """
import json
import speca.hunyuan_video15
import pipeline.parallel, speca
from speca import *
from pipeline.parallel import *
missing = [n for m in (speca, pipeline.parallel) for n in m.__all__ if getattr(m, n, None) is None]
print(json.dumps([missing, speca.supported()]))
"""
    missing, families = json.loads(_run(code))
    assert missing == []
    assert [f.split(" (")[0] for f in families] == ["DiT", "FLUX", "HunyuanVideo", "HunyuanVideo 1.5"]


def test_driver_help():
    done = subprocess.run([sys.executable, "-m", "jobs.generate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--speca" in done.stdout and "--ulysses-degree" in done.stdout
