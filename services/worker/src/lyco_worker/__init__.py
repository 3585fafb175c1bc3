"""Celery workers running Lyco jobs: training, generation and evaluation (queue ``gpu``) and adapter operations
(queue ``cpu``).

Modules: :mod:`.app` (the Celery app and its configuration), :mod:`.tasks` (the task ``lyco.run_job(job_id)``:
claim, run, register outputs, final state), :mod:`.runners` (one module per job kind, Celery-free),
:mod:`.reconcile` (jobs left running by dead workers) and :mod:`.cli` (``lyco worker``). Importing the package
loads none of them.
"""

__version__ = "0.1.0"
