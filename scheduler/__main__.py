"""``python -m scheduler``: the task-dispatcher command line."""

from scheduler.cli import main

main()
