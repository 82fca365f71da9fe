"""Frozen records of what a command did; `to_json` gives the contract's JSON (CONTRACT.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .io.atomic import OutputFile
from .verify.metrics import Metrics, Thresholds


@dataclass(frozen=True)
class WriteReport:
    """What a merge or export wrote (the contract's merge/export JSON)."""

    output: str
    files: list[OutputFile]
    num_tensors_merged: int
    seconds: float
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the run noticed and went ahead with
    quantization: dict | None = None  # the base's 4-bit settings and their source (None: no 4-bit weights)

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "files": [f.__dict__ for f in self.files],
            "num_tensors_merged": self.num_tensors_merged,
            "seconds": round(self.seconds, 3),
            **self.details,
            "quantization": self.quantization,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class CheckReport:
    """What `qmerge check` measured and decided (the contract's check JSON)."""

    passed: bool
    metrics: Metrics
    thresholds: Thresholds
    candidate: str
    candidate_kind: str
    failures: list[str]
    naive: Metrics | None = None
    delta_retention: float | None = None  # an NF4 export's share of the LoRA delta kept (from its provenance)
    extra: dict = field(default_factory=dict)  # llama_cpp statistics, task, against_base, data

    def to_json(self) -> dict:
        out = {
            "passed": self.passed,
            "metrics": asdict(self.metrics),
            "thresholds": asdict(self.thresholds),
            "candidate": self.candidate,
            "candidate_kind": self.candidate_kind,
            "failures": self.failures,
        }
        if self.naive is not None:
            out["naive_merge"] = asdict(self.naive)
        if self.delta_retention is not None:
            out["delta_retention"] = self.delta_retention
        return {**out, **self.extra}


@dataclass(frozen=True)
class Description:
    """What `qmerge inspect` found (the contract's inspect JSON; `extra` holds kind-specific keys)."""

    kind: str  # base | base-4bit | merged | adapter | gguf
    path: str
    architecture: str | None
    num_parameters: int | None
    quantization: dict | None
    adapter: dict | None
    modules: list[dict]
    problems: list[dict]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {
            "kind": self.kind,
            "path": self.path,
            "architecture": self.architecture,
            "num_parameters": self.num_parameters,
            "quantization": self.quantization,
            "adapter": self.adapter,
            "modules": self.modules,
            "problems": self.problems,
        }
        return {**out, **self.extra}
