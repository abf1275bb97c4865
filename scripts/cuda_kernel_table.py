"""Regenerate onnx_excite/data/cuda_kernels.json from onnxruntime-gpu's own kernel registry.

The table lists every kernel the CUDA execution provider registers: op, domain,
opset range and type constraints, as ``onnxruntime.capi._pybind_state.get_all_opkernel_def()``
returns them. ``onnx-excite check --provider cuda`` reads it, so the check needs neither
onnxruntime-gpu nor a GPU.

get_all_opkernel_def() instantiates the CUDA provider, which needs the CUDA libraries
and a driver. On a machine without them this script compiles tiny stand-ins (a C
compiler is needed) for exactly the symbols the provider library imports from
libcudart/libcublas/libcublasLt/libcurand/libcuda: they only let the library load and
the provider's constructor return; no kernel runs. The kernel registry itself is static
code inside libonnxruntime_providers_cuda.so, so the table is the same as on a GPU machine.

Run it in a scratch virtual environment, never in the project's one:

    python3 -m venv /tmp/ortgpu && /tmp/ortgpu/bin/pip install onnxruntime-gpu==1.31.1
    /tmp/ortgpu/bin/python scripts/cuda_kernel_table.py            # writes the table
    /tmp/ortgpu/bin/python scripts/cuda_kernel_table.py --stubs-only DIR   # just the stand-ins
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "onnx_excite" / "data" / "cuda_kernels.json"

# runtime functions whose out-parameters the provider's constructor reads
SPECIAL = r"""
#include <stdlib.h>
#include <string.h>
int cudaGetDeviceCount(int *c){ *c = 1; return 0; }
int cudaGetDevice(int *d){ *d = 0; return 0; }
int cudaDeviceGetAttribute(int *v, int a, int d){ *v = 0; return 0; }
int cudaRuntimeGetVersion(int *v){ *v = 13000; return 0; }
int cudaDriverGetVersion(int *v){ *v = 13000; return 0; }
int cudaGetDeviceProperties(void *p, int d){ memset(p, 0, 1008); return 0; }  /* sizeof(struct cudaDeviceProp), CUDA 13 */
int cudaMalloc(void **p, size_t n){ *p = malloc(n ? n : 1); return 0; }
int cudaMallocHost(void **p, size_t n){ *p = malloc(n ? n : 1); return 0; }
int cudaHostAlloc(void **p, size_t n, unsigned f){ *p = malloc(n ? n : 1); return 0; }
int cudaFree(void *p){ return 0; }
int cudaFreeHost(void *p){ return 0; }
int cudaStreamCreate(void **s){ *s = malloc(64); return 0; }
int cudaStreamCreateWithFlags(void **s, unsigned f){ *s = malloc(64); return 0; }
int cudaEventCreate(void **s){ *s = malloc(64); return 0; }
int cudaEventCreateWithFlags(void **s, unsigned f){ *s = malloc(64); return 0; }
int cudaMemGetInfo(size_t *f, size_t *t){ *f = 1ull << 34; *t = 1ull << 34; return 0; }
const char *cudaGetErrorString(int e){ return "stub"; }
const char *cudaGetErrorName(int e){ return "stub"; }
void **__cudaRegisterFatBinary(void *f){ static void *h[4]; return h; }
"""
SPECIAL_NAMES = {line.split("(")[0].split()[-1].lstrip("*") for line in SPECIAL.splitlines() if "(" in line}


def _imports(so: Path) -> dict[str, list[str]]:
    """Undefined dynamic symbols of ``so`` grouped by the library version they bind to."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[6] == "UND":
            name, _, ver = parts[7].partition("@")
            groups.setdefault(ver.lstrip("@"), []).append(name)
    return groups


def _needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line]


def build_stubs(capi: Path, outdir: Path) -> list[str]:
    """Compile a stand-in for every CUDA/cuDNN/TensorRT library the provider libraries need
    and that this machine lacks; return their names."""
    system = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")
    wanted: dict[str, set[str]] = {}
    for so in sorted(capi.glob("libonnxruntime_providers_*.so")):
        if so.name == "libonnxruntime_providers_shared.so":
            continue
        groups = _imports(so)
        loose = {s for s in groups.get("", []) if not s.startswith(("_", "Provider_"))}
        ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
        missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
        for lib in _needed(so):
            if lib in missing or lib.startswith(("libcudart", "libcuda.")):
                # the versioned imports bind to their library; the unversioned ones go everywhere
                wanted.setdefault(lib, set()).update(groups.get(lib, []), loose)
        for ver in groups:
            if ver and not ver.startswith(system) and ver not in wanted and ver in missing:
                wanted.setdefault(ver, set()).update(groups[ver])
    for lib, syms in sorted(wanted.items()):
        body = "#include <stdlib.h>\n#include <string.h>\n"
        body += SPECIAL if lib.startswith("libcudart") else ""
        body += "".join(f"int {s}(){{return 0;}}\n" for s in sorted(syms)
                        if s not in SPECIAL_NAMES and s != "getInferLibVersion" and s.isidentifier())
        if lib.startswith("libnvinfer"):
            body += "int getInferLibVersion(void){ return 100000; }\n"
        body += "int onnx_excite_stub_marker(void){return 0;}\n"
        src, vmap = outdir / f"{lib}.c", outdir / f"{lib}.map"
        src.write_text(body)
        args = ["gcc", "-shared", "-fPIC", "-o", str(outdir / lib), str(src), f"-Wl,-soname,{lib}"]
        vmap.write_text(f"{lib} {{ global: *; }};\n")
        args.append(f"-Wl,--version-script={vmap}")
        subprocess.run(args, check=True)
    return sorted(wanted)


def dump() -> dict:
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    kernels = []
    for k in C.get_all_opkernel_def():
        if k.provider != "CUDAExecutionProvider":
            continue
        lo, hi = k.version_range
        kernels.append({"op": k.op_name, "domain": k.domain or "ai.onnx", "since": lo, "until": hi,
                        "types": {name: sorted(types) for name, types in sorted(k.type_constraints.items())}})
    kernels.sort(key=lambda r: (r["domain"], r["op"], r["since"], json.dumps(r["types"])))
    return {"source": "onnxruntime.capi._pybind_state.get_all_opkernel_def(), provider CUDAExecutionProvider",
            "onnxruntime_gpu": ort.__version__,
            "generated": datetime.date.today().isoformat(),
            "command": "/tmp/ortgpu/bin/python scripts/cuda_kernel_table.py",
            "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stubs-only", metavar="DIR")
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    capi = Path(spec.origin).parent / "capi"
    so = capi / "libonnxruntime_providers_cuda.so"
    if not so.exists():
        sys.exit("error: this onnxruntime has no CUDA provider library; install onnxruntime-gpu in a scratch venv")
    if args.stubs_only:
        Path(args.stubs_only).mkdir(parents=True, exist_ok=True)
        build_stubs(capi, Path(args.stubs_only))
        return
    if os.environ.get("_ONNX_EXCITE_STUBBED") != "1":
        if not Path("/dev/nvidia0").exists():
            tmp = tempfile.mkdtemp(prefix="cuda-stubs-")
            build_stubs(capi, Path(tmp))
            env = dict(os.environ, LD_LIBRARY_PATH=tmp + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""),
                       _ONNX_EXCITE_STUBBED="1")
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
    table = dump()
    if not table["kernels"]:
        sys.exit("error: no CUDA kernel listed (the CUDA provider did not load)")
    kernels = table.pop("kernels")
    head = json.dumps(table, indent=1)[:-2]
    rows = ",\n".join(json.dumps([k["op"], k["domain"], k["since"], k["until"], k["types"]]) for k in kernels)
    Path(args.output).write_text(head + ',\n "columns": ["op", "domain", "since", "until", "types"],\n'
                                 ' "kernels": [\n' + rows + "\n ]\n}\n")
    print(f"wrote {len(kernels)} CUDA kernels (onnxruntime-gpu {table['onnxruntime_gpu']}) to {args.output}")


if __name__ == "__main__":
    main()
