"""Watch teacher sources and start a distillation for every teacher version not yet distilled.

    start (scan the sources, ask the MLflow registry what was distilled, publish rcm.new_teacher events) -> end

Sources (``--sources``, comma-separated): a folder of diffusers checkpoints (also Hugging Face cache
snapshots), an ``s3://`` prefix, ``mlflow:<registered teacher model>`` (``mlflow:`` alone: every
registered model tagged ``rcm.role=teacher``). A teacher version is known by its revision (content
hash / ETags / snapshot commit / registered version: rcm_steps.watch); one is "already distilled" when a
registered student carries it in its ``teacher_revision`` tag, or an MLflow run for it is RUNNING.

Each new one is published as the event ``rcm.new_teacher`` with ``{"teacher": <location>,
"teacher_revision": ..., "teacher_source": ...}``; the distill flow deployed with
``"trigger_on_new_teacher": true`` starts on it (Argo Events sensor). Locally:

    METAFLOW_USER=$USER python flows/teacher_watch_flow.py run --sources /models --publish print
On Kubernetes, hourly (infra/k8s, README "Operate it"):
    python flows/teacher_watch_flow.py --config execution infra/k8s/overlays/gpu-cluster/watch.json \\
        argo-workflows create
"""
from __future__ import annotations

import os

from metaflow import Config, FlowMutator, FlowSpec, Parameter, current, step

# local runs' fallback; the environment is read in start, never when the flow is compiled for Argo
LOCAL_TRACKING = "sqlite:///" + os.path.join(os.path.abspath(os.path.join(os.path.dirname(__file__), "..")),
                                             "mlflow.db")


class WatchTarget(FlowMutator):
    """``execution`` config: target kubernetes adds @kubernetes (image, namespace, service_account, secrets);
    ``schedule`` (cron, or hourly/daily/weekly) adds @schedule; ``project`` adds @project."""

    def pre_mutate(self, mutable_flow):
        ex = mutable_flow.execution
        if ex.get("target", "local") == "kubernetes":
            kw = {k: ex[k] for k in ("image", "namespace", "service_account", "secrets") if ex.get(k)}
            for _, s in mutable_flow.steps:
                s.add_decorator("kubernetes", deco_kwargs={**kw, "cpu": 1, "memory": 2048})
        sched = ex.get("schedule")
        if sched:
            mutable_flow.add_decorator("schedule", deco_kwargs={sched: True} if sched in ("hourly", "daily", "weekly")
                                       else {"cron": sched})
        if ex.get("project"):
            mutable_flow.add_decorator("project", deco_kwargs={"name": ex["project"]})


@WatchTarget
class TeacherWatchFlow(FlowSpec):
    """Start a distillation for every teacher version not distilled yet (commands: the module docstring)."""
    execution = Config("execution", default_value={"target": "local"},
                       help='{"target": "local"|"kubernetes", "schedule": "hourly", "image": ..., "secrets": [...]}')
    sources = Parameter("sources", default="",
                        help="comma-separated teacher sources: folders, s3:// prefixes, mlflow:<model name>; empty: "
                             "$RCM_TEACHER_SOURCES when the run starts (Kubernetes: ConfigMap rcm-endpoints)")
    mlflow_tracking_uri = Parameter("mlflow_tracking_uri", default="",
                                    help="empty: $MLFLOW_TRACKING_URI when the run starts (Kubernetes: ConfigMap "
                                         "rcm-endpoints), else sqlite:///<repo>/mlflow.db")
    publish = Parameter("publish", default="argo", help="argo (Argo Events webhook) | print (dry run)")
    max_events = Parameter("max_events", default=4, type=int, help="at most this many events per scan")

    @step
    def start(self):
        """Scan the teacher sources, skip versions already distilled, publish an rcm.new_teacher event per new one."""
        from mlflow.tracking import MlflowClient

        from rcm_steps.endpoints import watch_checks
        from rcm_steps.errors import ConfigError
        from rcm_steps.services import check_tracking
        from rcm_steps.watch import event_payload, new_teachers, publish, scan

        if self.publish not in ("argo", "print"):
            raise ConfigError(f"--publish {self.publish!r}; known: argo, print")
        # sources and tracking URI: the parameters, else (deployed runs) the pod's environment
        srcs, uri = watch_checks(self.sources, self.mlflow_tracking_uri, os.environ,
                                 self.execution.get("target", "local"), LOCAL_TRACKING)
        check_tracking(uri)
        client = MlflowClient(tracking_uri=uri)
        cands = [c for s in srcs for c in scan(s, client)]
        new, self.skipped = new_teachers(cands, client)
        self.new = [c.to_dict() for c in new]
        self.published = []
        for c in new[: self.max_events]:
            payload = event_payload(c)
            self.published.append({**payload, **publish(payload, self.publish)})
        for c in self.new:
            print(f"new teacher: {c['location']} revision {c['revision']}")
        for c in self.skipped:
            print(f"skipped: {c['location']} revision {c['revision']}: {c['reason']}")
        print(f"{current.flow_name}: {len(cands)} teacher version(s) in {len(srcs)} source(s), {len(self.new)} new, "
              f"{len(self.published)} event(s) {'published' if self.publish == 'argo' else 'printed'}")
        self.next(self.end)

    @step
    def end(self):
        """Nothing left to do: the events (or the dry-run lines) are out."""


if __name__ == "__main__":
    TeacherWatchFlow()
