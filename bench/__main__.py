"""``python -m bench``: run the side-by-side benchmark (``--postgres``: the PostgreSQL case,
:mod:`bench.postgres`)."""

import sys

if "--postgres" in sys.argv[1:]:
    from bench.postgres import main
else:
    from bench.run import main

main()
