"""The model card of a registered version: its lineage lines, the distilled guidance, the evaluate step's
sample grid, and the description text (:func:`student_card`, :func:`rcm_core.export.model_card` with the
registry's load code).

Versions without a diffusers export (embedded teacher) get :func:`plain_card`; :func:`register_card` is the
register step's Metaflow card.

Part of :mod:`rcm_steps.register` (which re-exports these); see its module doc.
"""
from __future__ import annotations

import tempfile
from typing import Any, Dict, Optional


def _guidance(meta: Dict[str, Any], run_id: Optional[str], spec) -> Optional[float]:
    """The CFG weight distilled into the student: meta's, the distill run's ``guidance`` param, else the teacher's."""
    if meta.get("guidance") is not None:
        return float(meta["guidance"])
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            v = MlflowClient().get_run(run_id).data.params.get("guidance")
            if v not in (None, "", "None"):
                return float(v)
        except Exception:  # noqa: BLE001 - no run params: fall back to the teacher's
            pass
    return float(spec.guidance) if spec is not None else None


def _run_grid(run_id: Optional[str]) -> Optional[bytes]:
    """The evaluate step's sample grid (run artifact ``eval/samples_grid.png``), if the run has one."""
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if not any(a.path == "eval/samples_grid.png" for a in client.list_artifacts(run_id, "eval")):
            return None
        with tempfile.TemporaryDirectory() as d:
            with open(client.download_artifacts(run_id, "eval/samples_grid.png", d), "rb") as f:
                return f.read()
    except Exception:  # noqa: BLE001 - the card goes without a grid
        return None

def _card_lineage(meta: Dict[str, Any], lineage: Dict[str, str], bundle: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Lineage lines of the model card: the teacher's version and path first, then the run's lineage tags
    (the most telling first; the card drops lines from the end when it must fit 5000 characters)."""
    first = ("teacher_revision", "teacher_location", "metaflow.flow", "metaflow.run_id", "mlflow_run_id", "method",
             "data_hash", "prompts_hash", "profile")
    out = {"teacher version": meta.get("teacher_version"), "registered from": (bundle or {}).get("registered_from")}
    out.update({k: lineage[k] for k in first if lineage.get(k)})
    out.update({k: v for k, v in lineage.items() if k not in out and k not in ("teacher", "teacher_version") and v})
    return out


def student_card(name: str, version: str, info: Dict[str, Any], card: Dict[str, Any], max_chars: int = 5000) -> str:
    """The model version's description: :func:`rcm_core.export.model_card` with the registry's load code."""
    from rcm_core.export import model_card

    steps = info["scheduler"]["num_inference_steps"]
    out_attr = "frames" if info["pipeline_class"] == "WanPipeline" else "images"
    load = ["diffusers (the version's text encoder, tokenizer and VAE fetched and hash-checked):", "```python",
            "from rcm_steps.register import load_diffusers_pipeline",
            f"pipe = load_diffusers_pipeline(\"models:/{name}/{version}\")   # RCMScheduler; GPU bf16 when there is one",
            f"out = pipe(\"...\", num_inference_steps={steps}, guidance_scale=1.0).{out_attr}[0]", "```"]
    reg = info.get("components", {}).get("registry", {})
    store = reg.get("bundle", "").replace(" (sha256)", "") or None
    extra = ("Artifacts: `diffusers/` (this pipeline without text encoder/tokenizer/VAE, README.md, single file), "
             "`meta.json`" + (", `teacher/` (text encoder, tokenizer, VAE)" if reg.get("mode") == "copy" else "")
             + "\n\n" + components_note(reg.get("mode"), store)
             + (f"\n\n{card['serving']}" if card.get("serving") else ""))
    return model_card(info, lineage=card.get("lineage"), metrics=card.get("metrics"),
                      grid="artifact:diffusers/samples_grid.png" if card.get("grid") else None,
                      model_uri=f"models:/{name}/{version}", export_path="<artifacts>/diffusers", version=version,
                      extra=extra, max_chars=max_chars, diffusers_load=load)


def components_note(mode: Optional[str], store: Optional[str] = None) -> str:
    """One line of the card: how the version's teacher components (text encoder, tokenizer, VAE) travel."""
    if mode == "copy":
        return ("Components: `copy` - the teacher's text encoder, tokenizer and VAE are in this version's `teacher/` "
                "artifact: it loads wherever the model's artifacts can be read.")
    if mode == "reference":
        return (f"Components: `reference` - the teacher's text encoder, tokenizer and VAE are fetched by sha256 from "
                f"{store or 'the content store'} (read access needed; if it moved, set RCM_COMPONENT_STORE, or "
                "RCM_TEACHER_DIR to a local copy of the teacher). A self-contained diffusers folder: `python -m "
                "rcm_steps.register export --model <model URI> --out DIR`.")
    return ("Components: in code - the embedded teacher ships in the package code this version carries; nothing "
            "else to fetch. No diffusers export (the teacher is not a diffusers pipeline).")


def speed_table(metrics: Optional[Dict[str, Any]]) -> list:
    """Markdown lines: seconds per sample of the teacher and of each student step count, as evaluate measured them
    in this run (sampling only, no decode, in evaluate's batches, on that step's machine), and the speedup."""
    from rcm_core.export import _fmt

    metrics = metrics or {}
    steps = sorted(int(k.split("/")[0][8:]) for k in metrics
                   if k.startswith("student_") and k.endswith("/sec_per_sample") and k.split("/")[0][8:].isdigit())
    teacher = metrics.get("teacher/sec_per_sample")
    if not steps or not teacher:
        return []
    rows = [f"| teacher ({_fmt(metrics.get('teacher/nfe'))} NFE) | {_fmt(teacher)} | 1 |"]
    rows += [f"| student, {k} step{'s' if k > 1 else ''} | {_fmt(metrics[f'student_{k}/sec_per_sample'])} | "
             f"{_fmt(teacher / metrics[f'student_{k}/sec_per_sample'])}x |"
             for k in steps if metrics.get(f"student_{k}/sec_per_sample")]
    return ["Speed measured by this run's evaluate step (sampling only, no decode; its machine, its batches; "
            "GPU serving numbers per option: BENCHMARKS.md, issue 23):", "",
            "| sampler | s per sample | speedup |", "|---|---|---|", *rows, ""]


def serving_table(metrics: Optional[Dict[str, Any]]) -> list:
    """Markdown lines: the serving variants this run's evaluate step measured (``--eval_serving``): per variant
    and step count its seconds per sample, speed against the plain student, distance of its latents to the plain
    student's (same noise), the quality metric the teacher has (digit accuracy or FD to the teacher), its first
    call and peak memory; empty when none was measured."""
    import re

    from rcm_core.export import _fmt

    metrics = metrics or {}
    names = sorted({m.group(1) for k in metrics if (m := re.match(r"(serve_.+_\d+)/sec_per_sample$", k))},
                   key=lambda n: (n.rsplit("_", 1)[0], int(n.rsplit("_", 1)[1])))
    if not names:
        return []
    qual = "digit_acc" if any(k.endswith("/digit_acc") for k in metrics) else "fd_teacher"
    rows = []
    for n in names:
        variant, k = n[len("serve_"):].rsplit("_", 1)
        m = {key: metrics.get(f"{n}/{key}") for key in ("sec_per_sample", "speedup_student", "rel_l2_student", qual)}
        base = metrics.get(f"student_{k}/{qual}")
        first = metrics.get(f"serve_{variant}/first_call_s")
        peak = metrics.get(f"serve_{variant}/peak_gib")
        rows.append(f"| {variant} | {k} | {_fmt(m['sec_per_sample'])} | {_fmt(m['speedup_student'])}x | "
                    f"{_fmt(m['rel_l2_student'])} | {_fmt(m[qual])} ({_fmt(base)}) | {_fmt(first)} | "
                    f"{_fmt(peak) if peak is not None else '-'} |")
    return ["Serving options measured by this run's evaluate step (`--eval_serving`; its machine, the eval prompts "
            "and noise of the plain student):", "",
            f"| variant | steps | s per sample | x student | latent rel L2 to the student | {qual} (student's) | "
            "first call s | peak GiB |", "|---|---|---|---|---|---|---|---|", *rows, ""]


def serving_note(meta: Dict[str, Any], uri: str, metrics: Optional[Dict[str, Any]] = None) -> str:
    """Markdown lines of the card: this run's measured speed per step count (:func:`speed_table`), the version's
    serving settings (FP8 linears, compiled blocks), its FP8 scales and how to switch them at load time (the load
    call, the environment, the generate CLI), then the serving variants evaluate measured (:func:`serving_table`)."""
    from dataclasses import asdict

    from rcm_core.nets.serving import ServingOptions

    sv = {**asdict(ServingOptions()), **(meta.get("serving") or {})}
    cal = meta.get("fp8_calibration")
    scales = (f"FP8 static scales: artifact `{cal['artifact']}` ({cal['layers']} layers, {cal['source']})" if cal
              else "no FP8 static scales (fp8=static is refused; fp8=dynamic needs none)")
    return "\n".join(speed_table(metrics) + [
        f"Serving: fp8={sv['fp8']}, compile={sv['compile']}, sparse={sv['sparse']}, overlap={sv['overlap']}; {scales}. FP8 needs a GPU of compute capability 8.9+ "
        "(L40S, H100, H200); reduce-overhead compiles CUDA graphs.",
        f"Switch at load time: `mlflow.pyfunc.load_model({uri!r}, model_config={{\"fp8\": \"static\", "
        "\"compile\": \"default\"})`, the environment (`RCM_FP8`, `RCM_COMPILE`) or "
        f"`python -m rcm_steps.generate --model {uri} --fp8 dynamic --compile default ...` "
        "(fp8: off | dynamic | static; compile: off | default | max-autotune-no-cudagraphs | reduce-overhead; "
        "sparse: off | sta:t<F>x<H>x<W>:w<F>x<H>x<W>, sliding-tile self-attention, `--sparse`, `RCM_SPARSE`; "
        "overlap: off | on, several clips decode while the next samples, `--overlap`, `RCM_OVERLAP`).", ""]
        + serving_table(metrics))      # last: a card cut at its length limit keeps the switches above


def predict_comment(meta: Dict[str, Any], task: Optional[str]) -> str:
    """What ``predict`` returns, for the load snippets: by task for real teachers, the latent shape for others."""
    from rcm_core.export import output_shape

    if task:
        return output_shape(task) + " float32 in [0, 1]"
    return f"(N, {', '.join(str(x) for x in meta['latent_shape'])}) float32 in [0, 1]"


def load_snippet(uri: str, meta: Dict[str, Any], task: Optional[str], tracking_uri: Optional[str] = None) -> list:
    """Markdown lines: load the version with MLflow and sample it; the generate CLI."""
    prompt = "a 3 drifting up" if meta.get("teacher") == "embedded" else "a red fox runs through snow"
    return (["```python", "import mlflow, pandas as pd"]
            + ([f"mlflow.set_tracking_uri({tracking_uri!r})"] if tracking_uri else [])
            + [f"model = mlflow.pyfunc.load_model({uri!r})",
               f"clips = model.predict(pd.DataFrame({{\"prompt\": [{prompt!r}], \"seed\": [0]}}))   # "
               + predict_comment(meta, task), "```",
               f"CLI: `python -m rcm_steps.generate --model {uri} --prompt {prompt!r} --out x."
               + {"t2v": "mp4", "t2i": "png"}.get(task, "gif")
               + (f" --tracking-uri {tracking_uri}" if tracking_uri else "") + "`"])


def plain_card(name: str, version: str, meta: Dict[str, Any], lineage: Dict[str, str], metrics: Dict[str, Any],
               aliases: list, reason: str, grid: bool, max_chars: int = 5000) -> str:
    """The description of a version without a diffusers export (embedded and module:factory teachers): what it is,
    where it came from, student vs teacher, the sample grid artifact, how to load it, its components."""
    from rcm_core.export import _fmt

    steps = int(meta.get("default_steps", 4))
    keys = sorted({k.split("/", 1)[1] for k in metrics if k.startswith(f"student_{steps}/")})
    rows = [f"| {k} | {_fmt(metrics.get(f'student_{steps}/{k}'))} | {_fmt(metrics.get(f'teacher/{k}'))} |"
            for k in keys]
    uri = f"models:/{name}/{version}"
    text = "\n".join(
        [f"# {name} v{version}",
         f"rCM student ({meta.get('method')}, {steps} steps) distilled from teacher `{meta['teacher']}` (revision "
         f"`{lineage.get('teacher_revision', meta.get('teacher_version', '?'))}`, location "
         f"`{lineage.get('teacher_location', '?')}`) by Metaflow `{lineage.get('metaflow.pathspec', '?')}`. "
         f"Aliases: {', '.join(aliases)} ({reason}).", ""]
        + ([f"| metric | student_{steps} | teacher (baseline) |", "|---|---|---|", *rows, ""] if rows else [])
        + ([f"Sample grid (rows: prompts; columns: teacher, students): artifact `samples_grid.png` "
            f"(`mlflow.artifacts.download_artifacts(\"{uri}\")` -> `artifacts/samples_grid.png`).", ""] if grid else [])
        + ["## Load", *load_snippet(uri, meta, None), "", components_note(None), "", "## Serving",
           serving_note(meta, uri, metrics)])
    return text[:max_chars]


def register_card(r, tracking_uri: Optional[str] = None) -> str:
    """Markdown of the register step's Metaflow card: the version, its aliases, the model URI, how to load it
    (``r``: :class:`rcm_steps.register.RegistrationResult`)."""
    import re

    meta, task = r.meta or {}, r.task
    alias = "champion" if "champion" in r.aliases else r.aliases[-1]
    bundle = meta.get("teacher_bundle") or {}
    safe_uri = re.sub(r"//[^/@]+@", "//***@", tracking_uri) if tracking_uri else None
    lines = [f"# Registered: {r.name} v{r.version}",
             f"- aliases: {', '.join(r.aliases)} - {r.reason}",
             f"- model URI: `models:/{r.name}@{alias}` (the alias moves with later runs); this version: "
             f"`{r.model_uri}`"] + ([f"- MLflow tracking URI: `{safe_uri}`"] if safe_uri else []) + [
             f"- {components_note(bundle.get('mode'), bundle.get('store'))}", "", "## Load",
             *load_snippet(r.model_uri, meta, task, safe_uri)]
    if task:
        lines += ["", "diffusers:", "```python", "from rcm_steps.register import load_diffusers_pipeline",
                  f"pipe = load_diffusers_pipeline({r.model_uri!r})", "```",
                  f"Self-contained diffusers folder: `python -m rcm_steps.register export --model {r.model_uri} "
                  "--out DIR`"]
    return "\n".join(lines)
