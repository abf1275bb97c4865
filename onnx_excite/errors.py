class ExciteError(Exception):
    """A user-facing error: its message is one clear line, shown without a traceback."""


class UnsupportedModelError(ExciteError):
    """The model holds nodes the excitation rewrite cannot handle.

    ``problems`` lists ``(op_type, node_name, reason)`` for every such node.
    """

    def __init__(self, problems):
        self.problems = list(problems)
        first = self.problems[0]
        more = f" (and {len(self.problems) - 1} more; run `onnx-excite check`)" if len(self.problems) > 1 else ""
        super().__init__(f"unsupported node {first[1]!r} ({first[0]}): {first[2]}{more}")
