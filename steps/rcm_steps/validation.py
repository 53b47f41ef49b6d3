"""Great Expectations gates: validate a DataFrame, write Data Docs, raise on failure.

Each gate runs in an ephemeral GE context with one Data Docs site rooted at a folder
the caller chooses (the step then copies it under the storage root and shows its page in
the card: :func:`docs_markdown`). A failing gate raises :class:`DataValidationError` whose message names
every failed expectation with its column and observed/unexpected values.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["DataValidationError", "GateReport", "run_gate", "collect_html", "docs_markdown"]

# (expectation class name in great_expectations.expectations, kwargs)
ExpectationSpec = Tuple[str, Dict[str, Any]]


class DataValidationError(RuntimeError):
    def __init__(self, message: str, report: "GateReport"):
        super().__init__(message)
        self.report = report


@dataclass
class GateReport:
    name: str
    success: bool
    results: List[Dict[str, Any]] = field(default_factory=list)
    docs_dir: Optional[str] = None
    docs_page: Optional[str] = None  # path of the validation page, relative to docs_dir
    context: Optional[str] = None    # why rows are missing (e.g. prompts removed per reason), for count failures

    @property
    def failed(self) -> List[Dict[str, Any]]:
        return [r for r in self.results if not r["success"]]

    def describe_failures(self) -> str:
        lines = []
        for r in self.failed:
            col = f" column={r['kwargs']['column']!r}" if "column" in r["kwargs"] else ""
            extra = {k: v for k, v in r["kwargs"].items() if k not in ("column", "batch_id")}
            detail = []
            if r.get("observed_value") is not None:
                detail.append(f"observed {r['observed_value']!r}")
            if r.get("unexpected_count"):
                detail.append(f"{r['unexpected_count']} unexpected, e.g. {r.get('unexpected_sample')!r}")
            if self.context and _is_count(r):
                detail.append(self.context)
            lines.append(f"  - {r['type']}{col} {extra}: {'; '.join(detail) or 'failed'}")
        return "\n".join(lines)


# expectations on how many rows there are (their failures are explained by the report's context)
_COUNT_COLUMNS = ("eval_count", "split")


def _is_count(r: Dict[str, Any]) -> bool:
    return "row_count" in r["type"] or r["kwargs"].get("column") in _COUNT_COLUMNS


def _quiet() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def run_gate(name: str, df, expectations: Sequence[ExpectationSpec], docs_dir: Optional[str] = None,
             raise_on_failure: bool = True, context: Optional[str] = None) -> GateReport:
    """Validate ``df`` against ``expectations``; Data Docs go to ``docs_dir`` if given.

    ``context`` (e.g. how many rows were removed for which reason) is added to the failure
    lines of count expectations, in the report and in the raised error.
    """
    from .progress import say

    t0 = time.perf_counter()
    say(f"data gate {name}: checking {len(df)} rows against {len(expectations)} expectations (Great Expectations)")
    _quiet()
    import great_expectations as gx
    import great_expectations.expectations as gxe

    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False}
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    site = "rcm"
    if docs_dir:
        os.makedirs(docs_dir, exist_ok=True)
        ctx.add_data_docs_site(site_name=site, site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": os.path.abspath(docs_dir)},
        })
    asset = ctx.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name)
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for cls_name, kwargs in expectations:
        cls = getattr(gxe, cls_name, None)
        if cls is None:
            raise ValueError(f"unknown Great Expectations expectation {cls_name!r}")
        suite.add_expectation(cls(**kwargs))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[site])] if docs_dir else []
    cp = ctx.checkpoints.add(gx.Checkpoint(name=f"{name}_checkpoint", validation_definitions=[vd],
                                           actions=actions, result_format={"result_format": "SUMMARY"}))
    res = cp.run(batch_parameters={"dataframe": df})
    results = []
    for run in res.run_results.values():
        for er in run.results:
            cfg = er.expectation_config
            r = er.result or {}
            results.append({
                "type": cfg.type,
                "kwargs": {k: v for k, v in dict(cfg.kwargs).items() if k != "batch_id"},
                "success": bool(er.success),
                "observed_value": _plain(r.get("observed_value")),
                "unexpected_count": r.get("unexpected_count"),
                "unexpected_sample": _plain((r.get("partial_unexpected_list") or [])[:3]),
            })
    report = GateReport(name=name, success=bool(res.success), results=results, docs_dir=docs_dir, context=context)
    say(f"data gate {name}: {len(results) - len(report.failed)} of {len(results)} expectations met "
        f"({time.perf_counter() - t0:.0f} s)")
    if docs_dir:
        pages = []
        for base, _d, files in os.walk(os.path.join(docs_dir, "validations")):
            pages += [os.path.relpath(os.path.join(base, f), docs_dir) for f in files if f.endswith(".html")]
        report.docs_page = sorted(pages)[-1].replace(os.sep, "/") if pages else "index.html"
    if raise_on_failure and not report.success:
        raise DataValidationError(
            f"data gate {name!r} failed {len(report.failed)} of {len(results)} expectations:\n"
            f"{report.describe_failures()}" + (f"\nData Docs: {docs_dir}" if docs_dir else ""), report)
    return report


def _plain(v: Any) -> Any:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return v.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def collect_html(docs_dir: str) -> Dict[str, bytes]:
    """The HTML pages of a Data Docs folder (relative path -> bytes), for an artifact."""
    out: Dict[str, bytes] = {}
    for base, _d, files in os.walk(docs_dir):
        for f in files:
            if f.endswith(".html"):
                p = os.path.join(base, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, docs_dir).replace(os.sep, "/")] = fh.read()
    return out


def docs_markdown(page_html, title: str, stored_at: str, height: int = 760) -> str:
    """Markdown that shows a Data Docs page inside a Metaflow card, where it opens also under ``card server``
    (which serves cards, not files: a link to the stored page, a local path or an ``s3://`` URL, cannot open
    there): the page itself in an iframe's ``srcdoc``, in a collapsed ``<details>``, on ONE line (a Markdown
    HTML block ends at a blank line), then the stored location as text."""
    import html

    if page_html is None:
        return f"{title}: no Data Docs page was written; stored Data Docs: `{stored_at}`"
    text = page_html.decode("utf-8", "replace") if isinstance(page_html, bytes) else str(page_html)
    doc = html.escape(text, quote=True).replace("\r", "&#13;").replace("\n", "&#10;")
    frame = (f'<iframe title="{html.escape(title)}" srcdoc="{doc}" sandbox="allow-scripts allow-popups" '
             f'style="width:100%;height:{int(height)}px;border:1px solid #ccc"></iframe>')
    return (f"<details><summary>{html.escape(title)}: Great Expectations Data Docs (click to open)</summary>"
            f"{frame}</details>\n\nStored Data Docs (open with a browser on that filesystem / bucket): "
            f"`{stored_at}`")
