"""The model card of an export (markdown): teacher lineage, sampler, guidance, evaluation table, sample grid,
how to load it. Written as the export's README.md (:func:`rcm_core.export.export_student`) and as a registered
model version's description (rcm_steps.register)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

__all__ = ["model_card", "eval_table", "output_shape"]


_CARD_KEYS = ("nfe", "sec_per_sample", "speedup", "digit_acc", "fd_data", "fd_teacher", "fd_teacher_latent",
              "latent_rmse_teacher", "diversity", "diversity_rel")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def output_shape(task: Optional[str]) -> str:
    """What a registered model's ``predict`` returns, by task: clips (N, 3, F, H, W) for text-to-video, images
    (N, 3, H, W) for text-to-image (Cosmos-Predict2)."""
    return "(N, 3, H, W) images" if task == "t2i" else "(N, 3, F, H, W) videos"


def eval_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table: one row per model (teacher, student_1, ...), the evaluation metrics as columns."""
    models = sorted({k.split("/", 1)[0] for k in metrics if "/" in k},
                    key=lambda m: (m != "teacher", int(m.split("_")[1]) if m.startswith("student_") and
                                   m.split("_")[1].isdigit() else 99, m))
    keys = [k for k in _CARD_KEYS if any(f"{m}/{k}" in metrics for m in models)]
    if not models or not keys:
        return ""
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(_fmt(metrics.get(f"{m}/{k}")) for k in keys) + " |")
    return "\n".join(lines)


def model_card(info: Mapping[str, Any], *, lineage: Optional[Mapping[str, Any]] = None,
               metrics: Optional[Mapping[str, Any]] = None, grid: Optional[str] = None,
               model_uri: Optional[str] = None, export_path: str = "<export dir>", version: Optional[str] = None,
               max_chars: Optional[int] = None, extra: str = "", diffusers_load: Optional[Sequence[str]] = None) -> str:
    """The model card (markdown) of an export: teacher lineage, sampler, guidance, evaluation table,
    sample grid, how to load it. Used for the export's README.md and a model version's description;
    ``max_chars`` drops the less essential parts first (the lineage tail, then the table) to fit;
    ``diffusers_load``: lines replacing the default "load with diffusers" block."""
    s, t, comps = info["scheduler"], info["teacher"], info.get("components", {})
    pipe = info["pipeline_class"]
    g = info.get("distilled_guidance")
    head = [f"# {info['name']}" + (f" v{version}" if version else ""),
            f"rCM few-step student of **{t['name']}**" + (f" ({t['hf_id']})" if t.get("hf_id") else "")
            + f", diffusers pipeline `{pipe}` with `RCMScheduler`.", "",
            "## Sampler",
            f"- steps: {s['num_inference_steps']} by default (1-{min(4, len(s['mid_t']) + 1)}); sigma_max "
            f"{s['sigma_max']:g}; mid times (TrigFlow t) {s['mid_t']}; timesteps "
            + ", ".join(f"{x:.4g}" for x in _timesteps(s)),
            f"- guidance: the teacher's CFG (weight {g:g}) is distilled into the student: run with "
            f"`guidance_scale=1.0` (no CFG)" if g is not None else
            "- guidance: CFG is distilled into the student: run with `guidance_scale=1.0` (no CFG)",
            "- scheduler: `rcm_core.scheduler.RCMScheduler` (pip install rcm-pipeline): no diffusers scheduler "
            "reproduces the sampler (arbitrary mid times, float64 renoising from the pipeline's generator). "
            "`import rcm_core.scheduler` before `from_pretrained`, or pass `scheduler=RCMScheduler.from_pretrained("
            "path, subfolder=\"scheduler\")`.",
            f"- exact sampler: pass `latents=rcm_core.export.initial_latents(pipe, noise)` (the start x_t0 = noise in "
            f"the pipeline's latent space; the pipeline's own initial noise is "
            f"{s.get('pipeline_start_ratio', 1 / s['init_noise_sigma']):.5g}x that); the renoising noise comes from `pipe.scheduler.set_noise_generator(g)` (else the global RNG)."]
    load_mlflow = ["## Load", "MLflow (GPU with bf16 and the fused attention kernel when there is one, else CPU):",
                   "```python", "import mlflow, pandas as pd",
                   f"model = mlflow.pyfunc.load_model({model_uri or 'models:/<name>@champion'!r})",
                   "clips = model.predict(pd.DataFrame({\"prompt\": [\"...\"], \"seed\": [0]}))   # "
                   + output_shape(info.get("task")) + " float32 in [0, 1]", "```"] if model_uri else ["## Load"]
    ref = comps.get("mode") == "reference"
    load_diff = ["diffusers" + (" (components by reference: `load_pipeline` adds the teacher's text encoder, "
                                "tokenizer and VAE)" if ref else "") + ":", "```python"]
    if ref:
        load_diff += ["import torch; from rcm_core.export import load_pipeline",
                      f"pipe = load_pipeline({export_path!r}, components_dir=<teacher dir>, "
                      "torch_dtype=torch.bfloat16, device=\"cuda\")"]
    else:
        load_diff += [f"import torch, rcm_core.scheduler; from diffusers import {pipe}",
                      f"pipe = {pipe}.from_pretrained({export_path!r}, torch_dtype=torch.bfloat16).to(\"cuda\")"]
    out_attr = "frames" if pipe == "WanPipeline" else "images"
    load_diff += [f"out = pipe(\"...\", num_inference_steps={s['num_inference_steps']}, guidance_scale=1.0)."
                  f"{out_attr}[0]", "```"]
    if diffusers_load is not None:
        load_diff = list(diffusers_load)
    files = ["## Files", f"- `transformer/`: the distilled (EMA) {info['transformer_class']} ({info.get('dtype')})",
             "- `scheduler/`: RCMScheduler config (sigma_max, mid_t, num_inference_steps)"]
    if info.get("single_file"):
        files.append(f"- `{info['single_file']}`: the transformer as one safetensors file, "
                     f"{info.get('single_file_dtype') or info.get('dtype')} ("
                     + ("Wan2.1 original tensor names: ComfyUI, `WanTransformer3DModel.from_single_file`)"
                        if info.get("single_file_format") == "wan-original" else "diffusers tensor names)"))
    files.append("- text encoder, tokenizer, VAE: " + (
        f"the teacher's, copied ({', '.join(comps.get('copied', []))})" if not ref else
        "the teacher's, by reference" + (" (sha256 in the model registry's component bundle)"
                                          if comps.get("registry") else f" ({comps.get('source')})")))
    label = f" ({t['label']})" if t.get("label") and t["label"] != t["name"] else ""
    lin = ["## Teacher lineage", f"- teacher: {t['name']}{label}, pipeline {t.get('pipeline_class')}"
           + (f", {t['hf_id']}" if t.get("hf_id") else "")]
    for k, v in (lineage or {}).items():
        if v not in (None, ""):
            lin.append(f"- {k}: {v}")
    table = eval_table(metrics or {})
    ev = (["## Evaluation", table] if table else []) + ([f"Sample grid (rows: prompts; columns: teacher, students): "
                                                          + (f"![samples]({grid})" if not grid.startswith("artifact:")
                                                             else f"`{grid[len('artifact:'):]}`")] if grid else [])
    parts = [head, ev, lin, load_mlflow + load_diff, files, [extra] if extra else []]

    def render(ps):
        return "\n".join("\n".join(p) + "\n" for p in ps if p).rstrip() + "\n"

    text = render(parts)
    if max_chars is not None:
        while len(text) > max_chars and len(lin) > 2:
            lin.pop()
            text = render([head, ev, lin, load_mlflow + load_diff, files, [extra] if extra else []])
        if len(text) > max_chars:
            text = render([head, [f"({len(ev)} evaluation lines: see the README.md artifact)"] if ev else [], lin,
                           load_mlflow + load_diff, files, [extra] if extra else []])
        text = text[:max_chars]
    return text


def _timesteps(s: Mapping[str, Any]) -> list:
    ts = [math.atan(s["sigma_max"]), *s["mid_t"][: s["num_inference_steps"] - 1]]
    return [s["timestep_scale"] * math.sin(t) / (math.cos(t) + math.sin(t)) for t in ts]
