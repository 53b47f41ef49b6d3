"""Two flow runs that start together against one tracking server must both get the experiment.

CI caught it on Postgres: both saw no ``rcm-distill-embedded``, both created it, the unique
constraint refused the second and its ``start`` step failed. The interleaving is replayed
here on a real sqlite store: the loser's lookup happens before the winner's insert.
"""
import threading

import pytest
from mlflow.tracking import MlflowClient

from rcm_steps.mlflow_run import experiment_id


class LateClient(MlflowClient):
    """A client whose first lookup ran before another process created the experiment."""

    def __init__(self, *a, winner=None, **k):
        super().__init__(*a, **k)
        self._winner, self._first = winner, True

    def get_experiment_by_name(self, name):
        if self._first:
            self._first = False
            self._winner.create_experiment(name)          # the other run wins the race now
            return None
        return super().get_experiment_by_name(name)


def test_the_run_that_loses_the_race_takes_the_winners_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    winner = MlflowClient(tracking_uri=uri)
    loser = LateClient(tracking_uri=uri, winner=winner)
    got = experiment_id(loser, "rcm-distill-embedded")
    assert got == winner.get_experiment_by_name("rcm-distill-embedded").experiment_id
    assert len([e for e in winner.search_experiments() if e.name == "rcm-distill-embedded"]) == 1


def test_threads_starting_together_share_one_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()      # the schema, once
    ids, errors, gate = [], [], threading.Barrier(4)

    def start():
        try:
            gate.wait()
            ids.append(experiment_id(MlflowClient(tracking_uri=uri), "shared", None))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=start) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and len(set(ids)) == 1 and len(ids) == 4


def test_other_errors_are_not_swallowed(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(Exception, match="(?i)invalid"):
        experiment_id(client, "")
