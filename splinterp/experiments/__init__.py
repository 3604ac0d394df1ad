"""Paper experiments and figures, one module per experiment, each exposing registered jobs.

See `splinterp.experiments.registry` for the job contract; `splinterp reproduce` runs every job.
"""

from splinterp.experiments.registry import Job, get, jobs, load_all, load_errors, register, run_job

__all__ = ["Job", "get", "jobs", "load_all", "load_errors", "register", "run_job"]
