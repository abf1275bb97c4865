"""Time one companion build with and without ``share_adjoints`` (docs/methods.md's numbers).

    python benchmarks/share_adjoints.py default features.13 grad,deconv,guided 1 40
    python benchmarks/share_adjoints.py MODEL LAYER[,LAYER] METHOD[,METHOD] BATCH RUNS

Both sessions run interleaved (2 intra-op threads, CPU, no spinning); prints the number of
Conv/ConvTranspose/Gemm/MatMul nodes and the median ms of each, and their ratio.
"""
import sys, time, numpy as np
from onnx_excite import build_excitation_model
from onnx_excite.models.resolve import resolve_model
from onnx_excite.run.ort import session_options
from onnx_excite.run.runtime import make_session
from onnx_excite.graph.canonicalize import load_model
model = load_model(resolve_model(sys.argv[1], allow_recipes=True).model)  # a path, "default" or a bench recipe
layers = sys.argv[2].split(",")
methods = tuple(sys.argv[3].split(","))
batch = int(sys.argv[4]); runs = int(sys.argv[5])
rng = np.random.default_rng(0)
preps = {}
for share in (False, True):
    b = build_excitation_model(model, layers, methods=methods, share_adjoints=share)
    s = make_session(b.model, ["CPUExecutionProvider"], options=session_options(2, spinning=False))
    x = rng.standard_normal((batch, *[d.dim_value or 224 for d in b.model.graph.input[0].type.tensor_type.shape.dim[1:]])).astype(np.float32)
    e = np.zeros((batch, b.num_classes), np.float32); e[:, 0] = 1
    outs = list(b.maps.values())
    nconv = sum(n.op_type in ("Conv","ConvTranspose","Gemm","MatMul") for n in b.model.graph.node)
    preps[share] = (s, outs, {b.inputs[0]: x, b.signal: e}, nconv)
res = {False: [], True: []}
for r in range(runs + 2):
    for share, (s, outs, feeds, _) in preps.items():
        t = time.perf_counter(); s.run(outs, feeds); dt = time.perf_counter() - t
        if r >= 2: res[share].append(dt * 1e3)
for share in (False, True):
    print(f"share={share} conv/gemm nodes={preps[share][3]} median ms={np.median(res[share]):.1f}")
print("ratio shared/plain", np.median(res[True]) / np.median(res[False]))
