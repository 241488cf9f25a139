"""``python -m bench``: run the side-by-side benchmark."""

from bench.run import main

main()
