"""Fleet tests: real Redis, real Celery workers."""
