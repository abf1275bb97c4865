"""Images/s of `explain` in one process vs on a local Ray instance with 1 and 2 model actors,
and Ray's fixed cost on three images.

    python benchmarks/ray_explain.py FOLDER [--limit N] [--cpus 2]

Runs the default model (MobileNetV2, features.13, MWP + c-MWP of the top-1 class) on the first
N images of FOLDER, each variant into a fresh output folder; Ray's start-up (ray.init) is
timed apart from the job. Prints a Markdown table with the ratio to one process.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from onnx_excite.apps.distributed import RaySettings, explain_on_ray
from onnx_excite.apps.explain import ExplainOptions, expand_inputs, explain_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = ap.parse_args()
    files = expand_inputs([Path(args.folder)])[: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    src = tmp / "in"
    src.mkdir()
    for f in files:
        shutil.copy(f, src)

    def opts(name):
        return ExplainOptions(model="default", out_dir=tmp / name, top=1, batch_size=8)

    def one_process(name):
        t = time.perf_counter()
        explain_files([src], opts(name))
        return len(files) / (time.perf_counter() - t), f"{time.perf_counter() - t:.1f} s"

    rows = []
    one, secs = one_process("one")
    rows.append(("one process (first run)", one, secs))
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
    init_s = time.perf_counter() - t
    for actors in (1, 2):
        _, stats = explain_on_ray([str(src)], opts(f"ray{actors}"),
                                  RaySettings(actors=actors, batch_size=8, cpus_per_actor=0.5 if actors > 1 else 1.0))
        rows.append((f"Ray, {actors} actor(s)", stats.images_per_second, f"{stats.seconds:.1f} s"))
    small = []   # the fixed cost: three photos, one process vs one actor (start, model shipping, build)
    from onnx_excite.apps.explain import sample_images

    t = time.perf_counter()
    explain_files(sample_images(), ExplainOptions(model="default", out_dir=tmp / "small1", top=1))
    small.append(time.perf_counter() - t)
    _, stats = explain_on_ray([str(p) for p in sample_images()],
                              ExplainOptions(model="default", out_dir=tmp / "small2", top=1), RaySettings(actors=1))
    small.append(stats.seconds)
    ray.shutdown()
    rate, secs = one_process("one-again")
    rows.append(("one process (again, after Ray)", rate, secs))
    print(f"{len(files)} images from {args.folder}; ray.init: {init_s:.1f} s (not in the rates)\n")
    print("| variant | images/s | x one process | job time |")
    print("|---|---|---|---|")
    for name, rate, secs in rows:
        print(f"| {name} | {rate:.2f} | {rate / one:.2f} | {secs} |")
    print(f"\n3 bundled photos: one process {small[0]:.1f} s, Ray with 1 actor {small[1]:.1f} s "
          f"(+ ray.init {init_s:.1f} s)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
