"""A finding of the fit checks (fit.py, adapter_fit.py): what inspect lists and merge refuses or warns of."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """A finding: severity is "error" (merge refuses) or "warning"; subject is "adapter" or "base"."""

    severity: str
    message: str
    subject: str = "adapter"

    def to_json(self) -> dict:
        return {"severity": self.severity, "message": self.message}
