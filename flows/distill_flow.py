"""rCM distillation as a Metaflow DAG.

    start -> curate -> cache_teacher -> distill (N nodes, @parallel + torchrun) -> evaluate -> register -> end

Local (CPU, gloo; storage under ./runs/storage, MLflow in ./mlflow.db):
    METAFLOW_USER=$USER python flows/distill_flow.py run                      # default profile
    METAFLOW_USER=$USER python flows/distill_flow.py run --profile smoke      # ~1.5 min
    ... run --nodes 2 --procs_per_node 1                                      # 2-node gang, locally
    ... run --prompts s3://bucket/prompts.parquet --prompt_column text --storage_root s3://bucket/rcm
    ... run --teacher /models/Wan2.1-T2V-1.3B-Diffusers --frames 17 --height 240 --width 416   # real teacher
Kubernetes / Argo Workflows (8 GPUs per distill node, NCCL; the image must have this
package installed, storage and MLflow must be shared):
    python flows/distill_flow.py --config-value execution '{"target": "kubernetes", "image": "..."}' \
        argo-workflows create
    python flows/distill_flow.py --config-value execution '{"target": "kubernetes"}' argo-workflows trigger \
        --nodes 4 --storage_root s3://bucket/rcm --mlflow_tracking_uri http://mlflow:5000
Then:
    python -m rcm_steps.generate --model models:/rcm-student-embedded@champion --prompt "a 3 drifting up" --out x.gif

The steps are thin glue over plain functions in ``rcm_steps`` (tested without Metaflow).
Every step carries ``@step_guard`` (rcm_steps.step_guard): a failure prints a short ``rCM: ...``
message (culprit and fix) above the traceback and ends the MLflow run FAILED, SIGTERM/SIGINT end
it KILLED, and the next attempt or a ``resume`` reopens it. ``resume`` continues distillation from
the last checkpoint of the origin run (the distill folder is keyed on the first run of a chain of
resumes) and keeps logging to the same MLflow run:
    python flows/distill_flow.py resume [--origin-run-id <run id>]
"""
from __future__ import annotations

import json
import os
import tempfile

from metaflow import (Config, FlowMutator, FlowSpec, JSONType, Parameter, card, current, parallel, retry, step)
from rcm_steps.errors import ConfigError
from rcm_steps.profiles import PROFILE_KEYS, PROFILES, parse_profiles
from rcm_steps.step_guard import step_guard

PROJECT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# local runs' fallbacks; read in start, never when the flow is compiled for Argo (rcm_steps.endpoints)
LOCAL_STORAGE = os.path.join(PROJECT_ROOT, "runs", "storage")
LOCAL_TRACKING = f"sqlite:///{os.path.join(PROJECT_ROOT, 'mlflow.db')}"

class ExecutionTarget(FlowMutator):
    """Local vs Kubernetes, chosen by the ``execution`` Config.

    Always: ``@resources(gpu=gpus_per_node)`` on distill (ignored by local runs, becomes
    ``nvidia.com/gpu`` on Kubernetes/Argo). With target "kubernetes": ``@kubernetes``
    on every step (a static @kubernetes would break local runs); distill also gets the config's
    ``shared_memory_mb`` (/dev/shm for NCCL), ``node_selector`` and ``tolerations`` (the overlays of
    infra/k8s set them), every step its ``secrets`` (Kubernetes Secrets as environment: credentials).
    Retraining (infra/k8s, README "Operate it"): ``schedule`` (a cron string, or hourly/daily/weekly)
    adds ``@schedule`` (an Argo CronWorkflow), ``trigger_on_new_teacher`` adds ``@trigger`` on the
    ``rcm.new_teacher`` event (an Argo Events Sensor; payload fields -> parameters as
    rcm_steps.watch.EVENT_PARAMETERS), ``project`` adds ``@project`` (namespaced deployments).
    """

    def pre_mutate(self, mutable_flow):
        ex = mutable_flow.execution
        gpus = int(ex.get("gpus_per_node", 8))
        for name, s in mutable_flow.steps:
            if name == "distill":
                s.add_decorator("resources", deco_kwargs={"gpu": gpus, "cpu": int(ex.get("cpu_per_node", 32)),
                                                          "memory": int(ex.get("memory_mb_per_node", 256000))})
            if ex.get("target", "local") == "kubernetes":
                kw = {k: ex[k] for k in ("image", "namespace", "service_account", "secrets") if ex.get(k)}
                if name == "distill":
                    kw["gpu"] = gpus
                    kw.update({k: ex[k] for k in ("node_selector", "tolerations") if ex.get(k)})
                    if ex.get("shared_memory_mb"):
                        kw["shared_memory"] = int(ex["shared_memory_mb"])
                s.add_decorator("kubernetes", deco_kwargs=kw)
        sched = ex.get("schedule")
        if sched:
            kw = {sched: True} if sched in ("hourly", "daily", "weekly") else {"cron": sched}
            if ex.get("timezone"):
                kw["timezone"] = ex["timezone"]
            mutable_flow.add_decorator("schedule", deco_kwargs=kw)
        if ex.get("trigger_on_new_teacher"):
            from rcm_steps.watch import EVENT_NAME, EVENT_PARAMETERS

            mutable_flow.add_decorator("trigger", deco_kwargs={"event": {
                "name": EVENT_NAME, "parameters": {param: field for field, param in EVENT_PARAMETERS.items()}}})
        if ex.get("project"):
            mutable_flow.add_decorator("project", deco_kwargs={"name": ex["project"]})


@ExecutionTarget
class RCMDistillFlow(FlowSpec):
    """rCM distillation of a teacher into a few-step student, registered in MLflow (commands: the module docstring)."""
    execution = Config("execution", default_value={"target": "local", "gpus_per_node": 8},
                       help='{"target": "local"|"kubernetes", "gpus_per_node": 8, "image": ..., "namespace": ..., '
                            '"schedule": "0 3 * * 0", "trigger_on_new_teacher": true, "project": ..., '
                            '"shared_memory_mb": ..., "node_selector": {...}, "tolerations": [...], "secrets": [...]}')
    profiles = Config("profiles", default_value=PROFILES, parser=parse_profiles,
                      help="the run profiles --profile picks from: a JSON file {name: {settings}} adds to (or "
                           "replaces) the built-in smoke and default; keys: " + ", ".join(PROFILE_KEYS) + ", config")

    teacher = Parameter("teacher", default="embedded",
                        help="teacher name (rcm_core.teachers) or a directory in diffusers layout")
    teacher_revision = Parameter("teacher_revision", default="",
                                 help="the teacher version (content hash / revision; rcm.new_teacher events set it); "
                                      "empty: computed for a directory, the teacher's version otherwise")
    teacher_source = Parameter("teacher_source", default="", help="where the teacher was found (events set it)")
    frames = Parameter("frames", default=0, type=int, help="real teachers: pixel frames; 0: the teacher's default")
    height = Parameter("height", default=0, type=int, help="real teachers: pixel height; 0: the teacher's default")
    width = Parameter("width", default=0, type=int, help="real teachers: pixel width; 0: the teacher's default")
    text_len = Parameter("text_len", default=0, type=int, help="real teachers: prompt tokens; 0: the teacher's default")
    teacher_dtype = Parameter("teacher_dtype", default="auto",
                              help="real teachers: float32 | bfloat16 | ...; auto: bfloat16 on GPUs, float32 on CPU")
    method = Parameter("method", default="rcm", help="rcm | scm | dmd | dcm")
    student_steps = Parameter("student_steps", default=4, type=int, help="default steps of the registered model")
    iterations = Parameter("iterations", default=0, type=int, help="0: profile value")
    batch_size = Parameter("batch_size", default=0, type=int, help="global batch; 0: profile value")
    nodes = Parameter("nodes", default=1, type=int)
    procs_per_node = Parameter("procs_per_node", default=0, type=int,
                               help="torchrun processes per node; 0: gpus_per_node on Kubernetes, 1 locally")
    storage_root = Parameter("storage_root", default="",
                             help="any fsspec URL (local path, s3://...); empty: $RCM_STORAGE_ROOT when the run "
                                  "starts (Kubernetes: ConfigMap rcm-endpoints), else ./runs/storage")
    mlflow_tracking_uri = Parameter("mlflow_tracking_uri", default="",
                                    help="empty: $MLFLOW_TRACKING_URI when the run starts (Kubernetes: ConfigMap "
                                         "rcm-endpoints), else sqlite:///<repo>/mlflow.db")
    seed = Parameter("seed", default=0, type=int)
    profile = Parameter("profile", default="default",
                        help="smoke | default | a profile of your own (--config profiles <file>)")
    prompts = Parameter("prompts", default="embedded", help="'embedded', a path/URL (.txt/.csv/.parquet)")
    prompt_column = Parameter("prompt_column", default="", help="column of a CSV/parquet prompt source")
    max_prompt_chars = Parameter("max_prompt_chars", default=0, type=int,
                                 help="prompt length limit in characters; 0: the teacher's (embedded: 200; real "
                                      "teachers: none, their limit is the text encoder's, --text_len tokens)")
    long_prompts = Parameter("long_prompts", default="truncate",
                             help="prompts over a limit: truncate (at a word / whole token) | drop")
    model_components = Parameter("model_components", default="reference",
                                 help="real teachers: how the registered model carries the text encoder, tokenizer, "
                                      "VAE and configs: reference (sha256 into <storage_root>/components) | copy "
                                      "(in the model version's artifacts)")
    gates = Parameter("gates", default="{}", type=JSONType,
                      help='JSON object: evaluation gates, e.g. {"min_digit_acc": 0.5}')
    distill_config = Parameter("distill_config", default="{}", type=JSONType,
                               help='JSON object: DistillConfig overrides, e.g. {"lr_student": 1e-5}')
    eval_serving = Parameter("eval_serving", default="", help="serving variants evaluate measures against the "
                             "student, e.g. fp8-static,compile (speed, first call, quality; in the card)")

    # ------------------------------------------------------------------ helpers
    def _mlflow(self):
        import mlflow

        mlflow.set_tracking_uri(self.run_tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = self.run_tracking_uri
        return mlflow.tracking.MlflowClient()

    def _storage(self):
        from rcm_steps.endpoints import apply_env
        from rcm_steps.storage import Storage

        apply_env(getattr(self, "endpoint_env", {}))    # distill's JobSet pods: the endpoints start saw
        return Storage(self.run_storage_root)

    def _run_prefix(self):
        return f"runs/{current.flow_name}/{current.run_id}"

    def _distill_prefix(self):
        """Distill outputs live under the first run of a chain of resumes, so ``resume`` finds its checkpoints."""
        return f"runs/{current.flow_name}/{getattr(self, 'storage_run_id', None) or current.run_id}"

    def _memory_check(self, on_k8s, cfg):
        """Real teachers on GPUs: fail before any work when distillation will not fit (MemoryError names
        settings that would). The estimate is for GPUs: skipped on CPU runs. ``cfg``: the run's DistillConfig."""
        if not self.teacher_info.get("real"):
            return None
        import torch

        gpus = self.nodes * self.nproc
        if on_k8s:
            mem = float(self.execution.get("gpu_memory_gib", 80))
        elif torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
        else:
            print("memory check skipped: CPU run (the estimate applies to GPUs)")
            return None
        from rcm_steps.teacher import plan_run

        est, config, notes = plan_run(self.teacher_info, cfg, self.settings["config"], gpus, mem)
        self.settings = {**self.settings, "config": config}
        for line in notes:
            print(line)
        return est

    # ------------------------------------------------------------------ steps
    @step_guard
    @step
    def start(self):
        """Check everything that can be checked before work starts (profile, options, teacher checkpoint, memory,
        MLflow server and storage reachable), then open the run's MLflow run."""
        from rcm_steps.teacher import (check_teacher_name, describe_teacher, teacher_label,
                                       teacher_options)

        from rcm_steps.evaluate import serving_variants_option
        from rcm_steps.profiles import json_object_option, profile_settings

        profile = profile_settings(self.profiles, self.profile)   # unknown name, bad --config profiles file: here
        gates, overrides = json_object_option("gates", self.gates), json_object_option("distill_config",
                                                                                         self.distill_config)
        if self.method not in ("rcm", "scm", "dmd", "dcm"):
            raise ConfigError(f"unknown method {self.method!r}; known: rcm, scm, dmd, dcm")
        from rcm_steps.endpoints import forwarded_env, start_checks
        from rcm_steps.services import check_services

        import re

        on_k8s = self.execution.get("target", "local") == "kubernetes"
        print("rCM: start: checking the trigger event, storage root, tracking URI and services", flush=True)
        # a new-teacher event without a teacher location stops here; the storage root and tracking URI: the
        # parameters, else (deployed runs) the pod's environment, else the local defaults; checked for the target
        ep = start_checks(self.storage_root, self.mlflow_tracking_uri, os.environ,
                          self.execution.get("target", "local"), LOCAL_STORAGE, LOCAL_TRACKING)
        self.run_storage_root, self.run_tracking_uri = ep.storage_root, ep.tracking_uri
        self.endpoint_env = forwarded_env(os.environ) if on_k8s else {}
        print(re.sub(r"//[^/@]+@", "//***@", f"rCM: start: MLflow {ep.tracking_uri} (from {ep.tracking_from}), "
                                             f"storage {ep.storage_root} (from {ep.storage_from})"), flush=True)
        # an unreachable MLflow server / S3 endpoint, or a wrong credential, fails here in seconds, naming it
        self.services = check_services(self.run_tracking_uri, self.run_storage_root)
        check_teacher_name(self.teacher)      # unknown names list the known ones; a bad directory says what it lacks
        from rcm_steps.register import check_components_mode
        check_components_mode(self.model_components)
        if self.nodes < 1:
            raise ConfigError(f"nodes must be >= 1, got {self.nodes}")
        self.nproc = self.procs_per_node or (max(1, int(self.execution.get("gpus_per_node", 8))) if on_k8s else 1)
        s = dict(profile)
        if self.iterations:
            s["iterations"] = self.iterations
        if self.batch_size:
            s["batch_size"] = self.batch_size
        s["gates"] = {**s["gates"], **gates}
        # DistillConfig overrides: the profile's, then the user's --distill_config
        s["config"] = {**s.get("config", {}), **overrides}
        s["eval_serving"] = list(serving_variants_option(self.eval_serving))   # an unreadable variant: here
        self.settings = s
        self.teacher_options = teacher_options(self.teacher, self.frames, self.height, self.width, self.text_len,
                                               self.teacher_dtype, device=None if on_k8s else "auto")
        # real teachers: checkpoint files, configs, tensor shapes and resolution are checked here, weights unread
        self.teacher_info = describe_teacher(self.teacher, self.teacher_options)
        if self.teacher_info.get("real"):     # its student must be exportable for diffusers, or register would fail
            from rcm_steps.register import check_export
            check_export(self.teacher)
        self.teacher_lineage = _teacher_lineage(self.teacher, self.teacher_info, self.teacher_revision,
                                                self.teacher_source)
        from rcm_steps.distill import build_config   # a bad DistillConfig fails here, naming the field
        dcfg = build_config(self.teacher_info.get("preset") or self.teacher, self.method, s["iterations"],
                            s["batch_size"], self.seed, s["config"])
        from rcm_core.teachers import check_student_layout   # Wan2.2 A14B: moe_student="one" with lora is refused
        self.student_layout = check_student_layout(dcfg, self.teacher_info.get("experts", 1))
        self.memory_estimate = self._memory_check(on_k8s, dcfg)
        self._storage().check_writable()
        # resume clones this artifact, so every run of a chain of resumes keeps the first run's id (a resume
        # that re-runs start takes its origin's); the distill checkpoints are stored under it
        self.storage_run_id = str(current.origin_run_id or current.run_id)
        client = self._mlflow()
        exp_name = f"rcm-distill-{teacher_label(self.teacher)}"
        loc = None
        if self.run_tracking_uri.startswith("sqlite:///"):
            loc = "file://" + os.path.join(os.path.dirname(self.run_tracking_uri[len("sqlite:///"):]), "mlruns")
        from rcm_steps.mlflow_run import experiment_id, param_value, run_name, source_tags
        exp_id = experiment_id(client, exp_name, loc)   # concurrent starts against one server: no lost race
        run = client.create_run(exp_id, run_name=run_name(teacher_label(self.teacher), self.method, self.profile,
                                                          current.run_id), tags={
            **source_tags(current.username, os.path.relpath(os.path.abspath(__file__), PROJECT_ROOT),
                          self.execution.get("target", "local")),
            "metaflow.flow": current.flow_name, "metaflow.run_id": str(current.run_id),
            "metaflow.run_ids": str(current.run_id), "rcm.storage_run_id": self.storage_run_id,
            **({"metaflow.origin_run_id": str(current.origin_run_id)} if current.origin_run_id else {}),
            "teacher": self.teacher, "teacher_version": self.teacher_info["version"],
            "method": self.method, "profile": self.profile, **self.teacher_lineage})
        self.mlflow_run_id = run.info.run_id
        params = {"teacher": self.teacher, "teacher_options": json.dumps(self.teacher_options),
                  "method": self.method, "nodes": self.nodes,
                  "procs_per_node": self.nproc, "seed": self.seed, "profile": self.profile,
                  "storage_root": self.run_storage_root, "prompts": self.prompts,
                  **{f"settings.{k}": v for k, v in s.items()}}
        from mlflow.entities import Param

        client.log_batch(self.mlflow_run_id, params=[Param(k, param_value(v)) for k, v in params.items()])
        print(f"MLflow run {self.mlflow_run_id} at {self.run_tracking_uri}")
        self.next(self.curate)

    @card
    @step_guard
    @step
    def curate(self):
        """Load, clean and split the prompts; the Great Expectations prompt gate (Data Docs in the card)."""
        from metaflow.cards import Markdown, Table

        from rcm_steps.curate import CurateConfig, curate_prompts, load_prompts, prompt_limits, validate_prompts
        from rcm_steps.validation import DataValidationError, collect_html, docs_markdown

        s = self.settings
        limits, tokenizer = prompt_limits(self.teacher_info, self.max_prompt_chars, self.long_prompts)
        cfg = CurateConfig(seed=self.seed, min_prompts=s["min_prompts"], max_train=s["max_train"],
                           max_eval=s["max_eval"], **limits)
        raw = load_prompts(self.prompts, column=self.prompt_column or None)
        res = curate_prompts(raw, cfg, tokenizer=tokenizer)
        st = self._storage()
        docs_key = f"{self._run_prefix()}/curate/data_docs"
        with tempfile.TemporaryDirectory() as d:
            report = validate_prompts(res.train, res.eval, cfg, docs_dir=d, raise_on_failure=False, stats=res.stats)
            self.data_docs_url = st.upload_dir(d, docs_key)
            self.data_docs_html = collect_html(d)
        self.data_docs_page = f"{self.data_docs_url}/{report.docs_page}"
        current.card.append(Markdown(f"# Prompt curation\nsource `{self.prompts}` (Data Docs: below, and artifact "
                                     f"`data_docs_html`)"))
        current.card.append(Table([[k, v] for k, v in res.stats.items()], headers=["stat", "count"]))
        current.card.append(Table([[r["type"], json.dumps(r["kwargs"]), "pass" if r["success"] else "FAIL",
                                    str(r.get("observed_value") or r.get("unexpected_sample") or "")]
                                   for r in report.results], headers=["expectation", "kwargs", "result", "observed"]))
        current.card.append(Markdown(docs_markdown(self.data_docs_html.get(report.docs_page), "prompt gate",
                                                   self.data_docs_page)))
        if not report.success:
            raise DataValidationError(f"prompt gate failed on --prompts {self.prompts!r}: "
                                      f"{len(report.failed)} expectation(s) not met:\n"
                                      f"{report.describe_failures()}\nData Docs: {self.data_docs_page}", report)
        self.train_prompts, self.eval_prompts = res.train, res.eval
        self.curate_stats, self.prompts_hash = res.stats, res.prompts_hash
        self._mlflow().log_batch(self.mlflow_run_id, metrics=_metrics({f"curate/{k}": v for k, v in res.stats.items()}))
        self.next(self.cache_teacher)

    @card
    @retry(times=1)
    @step_guard
    @step
    def cache_teacher(self):
        """Sample the teacher on the training prompts into verified latent shards (skips shards already cached)."""
        import torch
        from metaflow.cards import Image, Markdown, Table

        from rcm_steps.cache import CacheConfig, cache_teacher, load_cache
        from rcm_steps.evaluate import as_clips, clip_grid_png
        from rcm_steps.teacher import decode, load_teacher, pick_device
        from rcm_steps.validation import collect_html, docs_markdown

        s = self.settings
        teacher = load_teacher(self.teacher, device=pick_device("auto"), options=self.teacher_options)
        cfg = CacheConfig(samples_per_prompt=s["samples_per_prompt"], shard_size=s["shard_size"], seed=self.seed,
                          steps=s["teacher_steps"])
        st = self._storage()
        with tempfile.TemporaryDirectory() as d:
            res = cache_teacher(teacher, self.train_prompts, st, cfg, docs_dir=d)
            docs = st.upload_dir(d, f"{self._run_prefix()}/cache/data_docs")
            latent_docs = collect_html(d).get(res.report.docs_page)
        self.cache_url, self.data_hash = res.url, res.data_hash
        self.cache_summary = {"total": res.total, "computed_shards": res.computed_shards,
                              "skipped_shards": res.skipped_shards, "seconds": res.seconds, **res.stats}
        self.latent_docs_page = f"{docs}/{res.report.docs_page}"
        data = load_cache(res.url)
        n = min(6, data.latents.shape[0])
        clips = as_clips(decode(teacher, data.latents[:n])).unsqueeze(1)
        png = clip_grid_png({"teacher cache": clips}, [data.prompts[i] for i in data.prompt_idx[:n].tolist()])
        current.card.append(Markdown(f"# Teacher cache\n`{res.url}` - data hash `{res.data_hash[:16]}`"))
        current.card.append(Markdown(docs_markdown(latent_docs, "latent gate", self.latent_docs_page)))
        current.card.append(Table([[k, v] for k, v in self.cache_summary.items()], headers=["", ""]))
        current.card.append(Image(png, label="teacher samples (cached latents)"))
        self._mlflow().log_batch(self.mlflow_run_id, metrics=_metrics(
            {f"cache/{k}": v for k, v in self.cache_summary.items()}))
        del torch
        self.next(self.distill, num_parallel=self.nodes)

    @card
    @parallel
    @retry(times=1)
    @step_guard
    @step
    def distill(self):
        """Train the student with rCM under torchrun on every node (resumes from the last checkpoint); card: loss
        curves and samples over training."""
        from rcm_steps.launcher import port_for, run_torchrun

        st = self._storage()
        self.distill_url = st.url(f"{self._distill_prefix()}/distill")   # a resumed run continues its origin's
        s = self.settings
        args = ["--teacher", self.teacher, "--teacher-options", json.dumps(self.teacher_options),
                "--cache", self.cache_url, "--out", self.distill_url,
                "--method", self.method, "--iterations", s["iterations"], "--batch-size", s["batch_size"],
                "--seed", self.seed, "--config", json.dumps(s["config"]), "--ckpt-every", s["ckpt_every"],
                "--mlflow-run-id", self.mlflow_run_id, "--preview-steps", self.student_steps]
        env = {"MLFLOW_TRACKING_URI": self.run_tracking_uri}
        # test hook (not an option): RCM_FAULT_AT_STEP=<n> in the flow's environment kills the first attempt's
        # workers after step n; retries run clean
        env["RCM_FAULT_AT_STEP"] = os.environ.get("RCM_FAULT_AT_STEP", "0") if current.retry_count == 0 else "0"
        self.attempt = current.retry_count
        run_torchrun("rcm_steps.distill", args, env=env, nnodes=current.parallel.num_nodes,
                     node_rank=current.parallel.node_index, master_addr=current.parallel.main_ip,
                     master_port=port_for(f"{current.run_id}/{current.retry_count}"),
                     nproc_per_node=self.nproc)
        self.distill_result = st.read_json(f"{self._distill_prefix()}/distill/result.json")
        if current.parallel.node_index == 0:     # the card: loss curves, samples over training, glossary
            from metaflow.cards import Image, Markdown
            from rcm_steps.distill_card import build

            for kind, data, label in build(self.distill_result, self._mlflow(), self.mlflow_run_id):
                current.card.append(Markdown(data) if kind == "markdown" else Image(data, label=label))
        self.next(self.evaluate)

    @card
    @step_guard
    @step
    def evaluate(self, inputs):
        """Teacher vs the EMA student at 1, 2, 4 steps: quality, diversity, speed; the gates; card with samples,
        the metric table and glossary, and the training diagnostics."""
        import torch
        from metaflow.cards import Image, Markdown, Table
        from rcm_core.config import DistillConfig
        from safetensors.torch import load

        from rcm_steps.evaluate import (EvalConfig, check_gates, clip_grid_png, clips_gif, clips_mp4, evaluate,
                                        metric_table, student_denoiser, uses_digit_metrics)
        from rcm_steps.storage import Storage
        from rcm_steps.teacher import load_teacher

        first = inputs[0]
        for k in ("settings", "teacher_info", "teacher_lineage", "teacher_options", "memory_estimate", "mlflow_run_id", "eval_prompts", "train_prompts", "cache_url",
                  "data_hash", "distill_url", "distill_result", "storage_run_id", "prompts_hash", "data_docs_page",
                  "latent_docs_page", "cache_summary", "curate_stats", "data_docs_html", "data_docs_url"):
            setattr(self, k, getattr(first, k))
        for k in ("run_storage_root", "run_tracking_uri", "endpoint_env"):     # start's (rcm_steps.endpoints)
            setattr(self, k, getattr(first, k))
        self.distill_attempts = max(i.attempt for i in inputs) + 1
        s = self.settings
        teacher = load_teacher(self.teacher, options=self.teacher_options)
        ema_url = self.distill_result["ema_url"]
        ema = load(Storage(ema_url.rsplit("/", 1)[0]).read_bytes(ema_url.rsplit("/", 1)[1]))
        student = student_denoiser(teacher, ema)
        dcfg = DistillConfig.from_dict(self.distill_result["config"])
        cfg = EvalConfig(seeds=s["eval_seeds"], teacher_steps=s["eval_teacher_steps"], real_clips=s["real_clips"],
                         seed=self.seed, serving=s.get("eval_serving", ()))
        res = evaluate(teacher, student, self.eval_prompts, cfg, sigma_max=dcfg.sigma_max, mid_t=dcfg.mid_t)
        self.eval_metrics = res.metrics
        self.eval_settings = res.settings          # champion compares only versions evaluated alike
        self.fp8_scales = res.fp8_scales           # FP8 static scales of the student's own sampling (serving)
        self.gate_result = check_gates(res.metrics, s["gates"], steps=self.student_steps)
        png = clip_grid_png(res.clips, res.prompts)
        digits = uses_digit_metrics(teacher)
        batch = torch.cat([res.clips[m][:4, 0] for m in res.clips])
        gif = clips_gif(batch) if digits else clips_gif(batch, scale=None)
        fps = int((getattr(teacher, "meta", None) or {}).get("fps", 16))
        mp4, mp4_note = (None, "") if digits else clips_mp4(batch, fps=fps)
        self.sample_grid_png, self.sample_gif, self.sample_mp4, self.sample_mp4_note = png, gif, mp4, mp4_note
        client = self._mlflow()
        client.log_batch(self.mlflow_run_id, metrics=_metrics({f"eval/{k}": v for k, v in res.metrics.items()}))
        client.log_batch(self.mlflow_run_id, metrics=_metrics({"eval/gates_passed": float(self.gate_result["passed"])}))
        with tempfile.TemporaryDirectory() as d:
            media = [("samples_grid.png", png), ("samples.gif", gif)] + ([("samples.mp4", mp4)] if mp4 else [])
            for name, data in media:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
                client.log_artifact(self.mlflow_run_id, os.path.join(d, name), artifact_path="eval")
        models = list(res.clips)
        table = metric_table(res.metrics, models, digits)     # the card's table, and MLflow's (UI: compare runs)
        import mlflow

        mlflow.log_table(table, artifact_file="eval/metrics_table.json", run_id=self.mlflow_run_id)
        keys = [k for k in table if k != "model"]
        rows = [[m] + [_fmt(table[k][i]) if table[k][i] == table[k][i] else "" for k in keys]
                for i, m in enumerate(models)]
        current.card.append(Markdown(f"# Evaluation\n{len(res.prompts)} eval prompts x {cfg.seeds} seeds. "
                                     f"Gates: {'PASS' if self.gate_result['passed'] else 'FAIL'} "
                                     f"{self.gate_result['failures']}"))
        current.card.append(Table(rows, headers=["model"] + keys))
        current.card.append(Image(png, label="rows: prompts; columns: " + ", ".join(models)))
        current.card.append(Image(gif, label="GIF: 4 prompts per model (" + ", ".join(models) + ")"))
        if not digits:
            current.card.append(Markdown("MP4 (same clips): MLflow artifact `eval/samples.mp4`, Metaflow artifact "
                                         "`sample_mp4`" if mp4 else f"MP4: {mp4_note}"))
        # training diagnostics (distill's diagnostics.json): plot + summary in the card, MLflow train/diagnostics.*
        from rcm_steps import diagnostics

        self.train_diagnostics = diagnostics.load(self.distill_result.get("diagnostics_url")
                                                  or f"{self.distill_url}/{diagnostics.FILE}")
        diag_png = diagnostics.plot_png(self.train_diagnostics)
        diagnostics.log_to_mlflow(client, self.mlflow_run_id, self.train_diagnostics, diag_png)
        current.card.append(Markdown(diagnostics.markdown(self.train_diagnostics)))
        current.card.append(Image(diag_png, label="training diagnostics: DMD/sCM gradient ratio, critic loss "
                                                  "relative to its start, NaN-masked fractions; dashed: phases"))
        from rcm_steps import glossary

        current.card.append(Markdown(glossary.markdown([*keys, *sorted({glossary.term(k) for k in res.metrics}),
                                                        "gates_passed", *diagnostics.SERIES], title="Glossary")))
        self.next(self.register)

    @card
    @step_guard
    @step
    def register(self):
        """Register the student in the MLflow model registry (candidate; champion when it beats the current one)."""
        from metaflow.cards import Markdown
        from rcm_steps.register import model_name_for, register_card, register_student
        from rcm_steps.storage import Storage
        from rcm_steps.teacher import teacher_label

        self._mlflow()
        ema_url = self.distill_result["ema_url"]
        weights = Storage(ema_url.rsplit("/", 1)[0]).read_bytes(ema_url.rsplit("/", 1)[1])
        def read(url):                                       # LoRA runs: the adapter file(s), extra artifacts
            return Storage(url.rsplit("/", 1)[0]).read_bytes(url.rsplit("/", 1)[1]) if url else None
        lora, lora_2 = read(self.distill_result.get("lora_url")), read(self.distill_result.get("lora_2_url"))
        dcfg = self.distill_result["config"]
        meta = {"teacher": self.teacher, "teacher_version": self.teacher_info["version"],
                "latent_shape": self.teacher_info["latent_shape"], "default_steps": self.student_steps,
                "sigma_max": dcfg["sigma_max"], "mid_t": list(dcfg["mid_t"]), "method": self.method,
                "teacher_options": self.teacher_options,
                **({"student_layout": self.distill_result["student_layout"]}
                   if self.distill_result.get("student_layout") else {})}
        lineage = {"metaflow.flow": current.flow_name, "metaflow.run_id": str(current.run_id),
                   "metaflow.pathspec": current.pathspec, "teacher": self.teacher,
                   "teacher_version": self.teacher_info["version"], "data_hash": self.data_hash,
                   "prompts_hash": self.prompts_hash, "method": self.method, "mlflow_run_id": self.mlflow_run_id,
                   "cache_url": self.cache_url, "distill_url": self.distill_url, "profile": self.profile,
                   "rcm.storage_run_id": getattr(self, "storage_run_id", None) or str(current.run_id),
                   **getattr(self, "teacher_lineage", {}),
                   **({"metaflow.origin_run_id": str(current.origin_run_id)} if current.origin_run_id else {})}
        metrics = {k: v for k, v in self.eval_metrics.items() if k.startswith(f"student_{self.student_steps}/")
                   or k.startswith("teacher/")}
        # smoke runs (tiny eval set, gates off) never compete with real runs for "champion"
        name = model_name_for(teacher_label(self.teacher)) + ("-smoke" if self.profile == "smoke" else "")
        r = register_student(weights, meta, self.mlflow_run_id, lineage, self.eval_metrics,
                             self.gate_result["passed"], model_name=name, eval_settings=self.eval_settings,
                             gates=self.gate_result["gates"], components=self.model_components,
                             component_store=self._storage().url("components"), lora_adapter=lora,
                             lora_adapter_2=lora_2, fp8_scales=getattr(self, "fp8_scales", None))
        del metrics
        self.model_name, self.model_version, self.model_aliases = r.name, r.version, r.aliases
        current.card.append(Markdown(register_card(r, self.run_tracking_uri)))
        self.champion, self.champion_reason = r.champion, r.reason
        print(f"registered {r.name} v{r.version} aliases={r.aliases}: {r.reason}")
        self.next(self.end)

    @step_guard
    @step
    def end(self):
        """Close the MLflow run (FINISHED) and print the registered model."""
        self._mlflow().set_terminated(self.mlflow_run_id, "FINISHED")
        k = "digit_acc" if f"student_{self.student_steps}/digit_acc" in self.eval_metrics else "fd_teacher"
        print(f"done: model {self.model_name} v{self.model_version} {self.model_aliases}; "
              f"student_{self.student_steps} {k}={self.eval_metrics.get(f'student_{self.student_steps}/{k}')}")
        from rcm_steps.generate import how_to_load      # the exact models:/<name>@<alias> URI, and how to use it
        print(how_to_load(self.model_name, self.model_aliases, self.run_tracking_uri, self.eval_prompts[0]))


def _teacher_lineage(teacher, info, revision, source):
    """Tags naming the teacher version a run distils (MLflow run and model version): which student came from
    which teacher. The revision is the event's, else computed (rcm_steps.watch.teacher_revision)."""
    loc = teacher
    if os.path.isdir(os.path.expanduser(teacher)):
        loc = os.path.abspath(os.path.expanduser(teacher))
        if not revision:
            from rcm_steps.watch import teacher_revision

            revision = teacher_revision(loc)
    return {"teacher_location": loc, "teacher_revision": revision or f"version:{info['version']}",
            "teacher_source": source or "manual"}


def _metrics(d):
    import math
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]


def _fmt(v):
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


if __name__ == "__main__":
    from rcm_steps.step_guard import sigterm_as_interrupt

    sigterm_as_interrupt()      # SIGTERM stops the run like Ctrl-C: tasks end their MLflow run KILLED, logs flushed
    RCMDistillFlow()
