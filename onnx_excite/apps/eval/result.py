"""The outcome of one evaluation, shared by the report writers and the CLI."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ...errors import ExciteError


@dataclass
class EvalResult:
    """Settings, counts, per-item outcomes and per-method summaries of one evaluation.

    ``items`` hold one dict per scored unit: an (image, class) pair for the pointing game
    (``hits`` / ``points`` per method label), an image for localization (``correct``: one bool
    per alpha per method label). ``summary[label]`` is :func:`metrics.pointing_summary` or
    :func:`metrics.localization_summary` of the items. ``unmapped`` counts, per dataset class
    without a model mapping, the (image, class) pairs (pointing) or images (localization) it
    made the run skip. For the faithfulness protocol an item is an (image, target) pair with the
    area under each curve per method label (``auc``) and the curves; ``comparisons`` holds the
    paired tests of every two labels.
    """

    protocol: str
    settings: dict
    counts: dict
    summary: dict
    items: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    unmapped: dict = field(default_factory=dict)
    unmapped_reasons: dict = field(default_factory=dict)
    mapping: Optional[dict] = None
    seconds: float = 0.0
    files: dict = field(default_factory=dict)
    comparisons: list = field(default_factory=list)   # faithfulness: paired tests of every two methods

    @property
    def labels(self) -> list[str]:
        """Result rows in order: ``cmwp:<layer>``, ..., ``center``."""
        return list(self.summary)

    @property
    def unmapped_classes(self) -> list[str]:
        """Dataset classes the model has no output for (sorted): they are not evaluated."""
        return sorted(self.unmapped)

    @property
    def unit(self) -> str:
        return "pairs" if self.protocol in ("pointing", "faithfulness") else "images"

    def overall_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the overall table, values as printed (percentages with one decimal)."""
        rows = []
        if self.protocol == "faithfulness":
            kinds = self.settings.get("curves") or ["deletion", "insertion"]
            header = ["method"]
            for k in kinds:
                header += [f"{k} AUC {'↓' if k in ('deletion', 'morf') else '↑'}", "95 % CI"]
            header.append("pairs")
            for m, s in self.summary.items():
                row = [m]
                for k in kinds:
                    row += [auc_text(s[k]["mean"]), ci_text(s[k]["low"], s[k]["high"])]
                rows.append(row + [str(s["n"])])
            return header, rows
        if self.protocol == "pointing":
            header = ["method", "all", "difficult", "hits / pairs", "classes"]
            for m, s in self.summary.items():
                rows.append([m, pct(s["mean_accuracy"]), pct(s["mean_accuracy_difficult"]),
                             f"{s['hits']} / {s['hits'] + s['misses']}", str(s["n_classes"])])
        else:
            header = ["method", "error", "alpha", "held-out error", "held-out / test images"]
            for m, s in self.summary.items():
                alpha = "–" if s["alpha"] is None else f"{s['alpha']:g}"
                rows.append([m, pct(s["error"]), alpha, pct(s["held_out_error"]), f"{s['n_held_out']} / {s['n_test']}"])
        return header, rows

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EvalResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        tmp.replace(path)


def auc_text(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.4f}"


def ci_text(lo: Optional[float], hi: Optional[float]) -> str:
    return "–" if lo is None or hi is None else f"[{lo:.4f}, {hi:.4f}]"


def pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def load_results(out_dir) -> EvalResult:
    """The :class:`EvalResult` saved in ``out_dir/results.json``."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise ExciteError(f"{path}: no results here (run an evaluation with this output folder first)")
    try:
        return EvalResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ExciteError(f"{path}: cannot read results ({exc})") from None
