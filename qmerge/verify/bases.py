"""`qmerge check --compare-merge-bases`: which base to merge the adapter into, measured on the user's model.

Two merges are computed without writing either (streamed.py, streamed_merge): into the NF4 weights
training saw (`--merge-base dequantized`, qmerge's default) and into the original 16-bit base (what
Unsloth does). Each is compared with the unmerged model (on --data's response tokens, else on text) and
with the base model (on text); the one closer to the unmerged model on that data is recommended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..pipeline.base import QuantSettings
from ..pipeline.model import streamed_merge
from ..pipeline.source import open_checkpoint
from .check import Options, Runner, Session, resolve_device

ROUTES = ("dequantized", "original")
# Mean KLs closer than this factor are a tie; the merge into the weights training saw is then preferred.
TIE = 1.25


@dataclass(frozen=True)
class BasesReport:
    """Both merges' drift from the unmerged model and from the base model, and the recommendation."""

    routes: dict[str, dict]
    recommendation: str
    reason: str
    measured_on: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "routes": self.routes,
            "recommendation": self.recommendation,
            "reason": self.reason,
            "measured_on": self.measured_on,
            **self.extra,
        }


def compare_merge_bases(
    adapter: Path, base: Path | None, quant: QuantSettings | None, progress=None, **option_values
) -> BasesReport:
    """Measure both merge bases against the unmerged model and the base model; recommend one."""
    opts = Options(**{**option_values, "against_base": True, "naive": False, "generate": 0})
    other = opts.allow_other_base
    source = open_checkpoint(Path(adapter), Path(base) if base else None, quant, allow_other_base=other)
    if source.base.is_4bit:
        raise InputError(
            f"{source.base.path} is a 4-bit base: comparing merge bases needs the 16-bit base the adapter was "
            "trained from (the 'original' route merges into it). Pass it with --base."
        )
    session = Session(source, opts, resolve_device("cpu"), progress)
    routes = {}
    try:
        for route in ROUTES:
            src = (
                source
                if route == "dequantized"
                else open_checkpoint(Path(adapter), source.base.path, quant, route, allow_other_base=other)
            )
            merged = Runner(f"merge into {route}", streamed_merge(src), progress=progress)
            metrics, stats = session.measure(merged)
            routes[route] = {"vs_unmerged": {"metrics": metrics.__dict__, "llama_cpp": stats}}
            routes[route]["vs_base"] = session.against_base(merged)
    finally:
        session.close()
    pick, reason = recommend(routes)
    return BasesReport(routes, pick, reason, f"response tokens of {opts.data}" if opts.data else "text")


def recommend(routes: dict[str, dict]) -> tuple[str, str]:
    """The route whose merge stays closer to the unmerged model (mean KL); the weights training saw on a tie."""
    kl = {r: routes[r]["vs_unmerged"]["metrics"]["mean_kl"] for r in ROUTES}
    deq, orig = kl["dequantized"], kl["original"]
    if orig * TIE < deq:
        return "original", (
            f"the merge into the 16-bit base stays closer to the model you evaluated (mean KL {orig:.3g} against "
            f"{deq:.3g})."
        )
    if deq * TIE < orig:
        why = f"mean KL {deq:.3g} against {orig:.3g}"
    else:
        why = f"mean KL {deq:.3g} against {orig:.3g}, within a factor {TIE:g}: a tie, and it is the model that was trained"
    return (
        "dequantized",
        f"the merge into the NF4 weights training saw stays closer to the model you evaluated ({why}).",
    )
