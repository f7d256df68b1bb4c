"""AIConfigurator's own estimator on silicon_sample rows: the same-run anchor of ``serve_silicon.py``.

Drives aiconfigurator-core's aggregated (continuous-batching) estimate the way its own sweep
does for one candidate (``sdk/backends/base_backend.py`` ``BaseBackend.run_agg``): the model
built from the row's checkpoint (``sdk/models.get_model`` with ``sdk/config_builders.build_model_config``
at the row's TP / attention-DP / MoE-TP / EP and GEMM / MoE formats, the rest inferred from the
checkpoint as AIConfigurator infers it), the backend's perf database, batch = the row's
concurrency and one prompt per mixed step (``ctx_tokens`` = ISL). Database versions are tried
newest first; a row no version can price (a kernel table the package lacks for that shape) is
reported as not priced. Needs the package importable (its wheel folder on ``sys.path``) and
pandas / pyarrow / scipy.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

GEMM_MODE = {"bf16": "bfloat16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4"}
MOE_MODE = {"bf16": "bfloat16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4", "mxfp4": "w4a16_mxfp4"}


class AicEstimator:
    """(TTFT, TPOT) in seconds from aiconfigurator-core's estimator, or None where it cannot price
    a row; ``package`` is the folder an aiconfigurator-core wheel was unzipped into."""

    def __init__(self, package: str) -> None:
        if package not in sys.path:
            sys.path.insert(0, package)
        logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
        from aiconfigurator_core.sdk.backends.factory import get_backend
        from aiconfigurator_core.sdk.config import RuntimeConfig
        from aiconfigurator_core.sdk.config_builders import build_model_config
        from aiconfigurator_core.sdk.models import get_model
        from aiconfigurator_core.sdk.perf_database import get_database
        self._api = (get_backend, RuntimeConfig, build_model_config, get_model, get_database)
        self._systems = Path(package) / "aiconfigurator_core" / "systems" / "data"
        self._db: dict[tuple[str, str, str], Any] = {}
        self._models: dict[tuple, Any] = {}
        self.failures: dict[str, int] = {}

    def _versions(self, system: str, backend: str) -> list[str]:
        folder = self._systems / system / "moe" / backend
        names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        return sorted(names, key=lambda v: [int(x) if x.isdigit() else 0 for x in v.replace("rc", ".").replace(
            "post", ".").split(".")], reverse=True)

    def _database(self, system: str, backend: str, version: str) -> Any:
        key = (system, backend, version)
        if key not in self._db:
            self._db[key] = self._api[4](system, backend, version)
        return self._db[key]

    def _model(self, row: Any, fmha: str | None) -> Any:
        lay, pr = row.layout, row.precision
        key = (row.model_path, row.backend, lay, pr, fmha)
        if key not in self._models:
            cfg = self._api[2](tp_size=lay.attention_tp, pp_size=1, attention_dp_size=lay.attention_dp,
                               moe_tp_size=lay.moe_tp, moe_ep_size=lay.moe_ep, fmha_quant_mode=fmha,
                               gemm_quant_mode=GEMM_MODE.get(pr.gemm), moe_quant_mode=MOE_MODE.get(pr.moe))
            self._models[key] = self._api[3](row.model_path, cfg, row.backend)
        return self._models[key]

    def predict(self, row: Any) -> tuple[float, float] | None:
        """AIConfigurator's (TTFT, TPOT) for ``row`` (a ``serve_silicon.SiliconRow``), or None. The
        attention format AIConfigurator infers from the checkpoint is tried first, bf16 attention
        (what vLLM and SGLang run by default) where the package holds no table for the inferred one."""
        get_backend, runtime_config = self._api[0], self._api[1]
        last: Exception | None = None
        for fmha in (None, "bfloat16"):
            try:
                model = self._model(row, fmha)
            except Exception as exc:      # the package raises many types for configs it does not support
                last = exc
                continue
            for version in self._versions(row.system, row.backend):
                try:
                    db = self._database(row.system, row.backend, version)
                    if db is None:
                        continue
                    summary = get_backend(row.backend).run_agg(
                        model, db, runtime_config(batch_size=row.concurrency, isl=row.isl, osl=row.osl),
                        ctx_tokens=row.isl)
                    rec = summary.get_summary_df()[["ttft", "tpot"]].to_dict("records")
                    if rec:
                        return rec[0]["ttft"] / 1e3, rec[0]["tpot"] / 1e3
                except Exception as exc:  # no kernel data for this shape in this version: try an older one
                    last = exc
        self._fail(last)
        return None

    def _fail(self, exc: Exception | None) -> None:
        name = type(exc).__name__ if exc is not None else "no result"
        self.failures[name] = self.failures.get(name, 0) + 1
