"""The JSON job store: task records in ``dispatch_config.json``, served to APScheduler."""

from jobstores.jsonfile import STATE_FILENAME, JsonJobStore, SaveHealth

__all__ = ["STATE_FILENAME", "JsonJobStore", "SaveHealth"]
