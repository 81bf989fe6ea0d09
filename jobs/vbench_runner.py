"""Runs inside the VBench environment (its own virtualenv): score a folder of videos with vbench.

Executed by path with that environment's interpreter, never imported by the job itself, so it
uses only the standard library and vbench. `jobs.vbench_env` builds the command line.

    <vbench-env>/bin/python jobs/vbench_runner.py --videos DIR --prompts prompts.json \
        --dimensions temporal_flickering --output DIR [--device cpu]
    <vbench-env>/bin/python jobs/vbench_runner.py --lpips-pairs pairs.json --lpips-weights FILE --output DIR

LPIPS (v0.1, AlexNet) is pyiqa's implementation, which vbench already installs; its weights are
read from the given file and from $TORCH_HOME/hub/checkpoints (set by the caller), never fetched.
"""

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", help="folder of <id>.mp4 files")
    parser.add_argument("--prompts", help="JSON object: file name -> prompt")
    parser.add_argument("--dimensions", help="comma-separated VBench dimensions")
    parser.add_argument("--lpips-pairs", help="JSON list of [id, video, reference video] to compare with LPIPS")
    parser.add_argument("--lpips-weights", help="pyiqa's LPIPS_v0.1_alex-df73285e.pth")
    parser.add_argument("--output", required=True, help="folder for the result JSON")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.lpips_pairs:
        return lpips(args)

    import vbench
    from vbench import VBench

    with open(args.prompts) as f:
        prompts = json.load(f)
    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    bench = VBench(args.device, full_info, args.output)
    # local=True: every weight comes from $VBENCH_CACHE_DIR (checked beforehand); nothing is fetched.
    bench.evaluate(videos_path=args.videos, name="run", prompt_list=prompts,
                   dimension_list=args.dimensions.split(","), local=True, mode="custom_input")
    print(json.dumps({"vbench_version": getattr(vbench, "__version__", None) or _version(),
                      "results": os.path.join(args.output, "run_eval_results.json")}), flush=True)
    return 0


def _frames(path: str):
    import cv2
    import torch

    video = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    video.release()
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return torch.stack(frames).permute(0, 3, 1, 2).float().div(255.0)


def lpips(args) -> int:
    """Per-frame LPIPS in [0, 1] input range, averaged over frames, per video pair."""
    import torch
    from pyiqa.archs.lpips_arch import LPIPS

    with open(args.lpips_pairs) as f:
        pairs = json.load(f)
    model = LPIPS(net="alex", version="0.1", pretrained_model_path=args.lpips_weights).to(args.device).eval()
    out = {}
    with torch.no_grad():
        for sample_id, video, reference in pairs:
            a, b = _frames(video).to(args.device), _frames(reference).to(args.device)
            out[sample_id] = float(model(a, b).reshape(-1).mean())
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "lpips.json"), "w") as f:
        json.dump(out, f)
    return 0


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vbench")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
