"""ONNX Runtime itself: importing it (one error line when it is missing) and the
SessionOptions every session here is made with."""
from __future__ import annotations

from ..errors import ExciteError

INSTALL_HINT = ("ONNX Runtime is not installed: pip install 'onnx-excite[cpu]' "
                "(or 'onnx-excite[gpu]' for the CUDA build; install only one of them)")


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExciteError(INSTALL_HINT) from None
    return ort


#: ORT graph optimisation levels by name (``session_options(opt_level=...)``)
OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, spinning: bool | None = None, opt_level: str = "all",
                    mem_pattern: bool = True, cpu_arena: bool = True):
    """The SessionOptions every session here uses: ``threads`` intra-op threads (None: ORT's
    default, one per core), ``spinning`` (None: ORT's default, on; False stops idle worker
    threads busy-waiting, which on a shared machine steals the cores other runs need),
    graph optimisation ``opt_level`` (one of OPT_LEVELS; ORT's default ``all``), memory
    pattern and CPU arena (ORT's defaults, on)."""
    ort = import_ort()
    if opt_level not in OPT_LEVELS:
        raise ExciteError(f"graph optimisation level {opt_level!r}: expected one of {', '.join(OPT_LEVELS)}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = {"disable": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
                                     "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}[opt_level]
    opts.enable_mem_pattern = mem_pattern
    opts.enable_cpu_mem_arena = cpu_arena
    opts.log_severity_level = 3
    return opts


def describe_session_options(opts) -> dict[str, object]:
    """What a SessionOptions holds, for reports (``bench`` prints it)."""
    def entry(key, default):
        try:
            return opts.get_session_config_entry(key) or default
        except Exception:  # not set
            return default

    return {"graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
            "intra_op_num_threads": opts.intra_op_num_threads or "ORT default (one per core)",
            "allow_spinning": entry("session.intra_op.allow_spinning", "1 (ORT default)"),
            "enable_mem_pattern": opts.enable_mem_pattern, "enable_cpu_mem_arena": opts.enable_cpu_mem_arena}
