"""The worker's Celery app at its documented path: ``celery -A scheduler.worker worker``.

The worker is :mod:`scheduler.fleet.worker`; this module names it for Celery's command line
and for hosts that import it from here.
"""

from scheduler.fleet.worker import app, check_durability, execute_run, load_factory, make_app

__all__ = ["app", "check_durability", "execute_run", "load_factory", "make_app"]
