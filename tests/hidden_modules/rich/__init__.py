# conftest.py puts this folder first on the PYTHONPATH of the processes the tests start, so
# ``import rich`` fails there as on a machine without it. Where rich is installed (sqlite-sync-core,
# a benchmark peer, brings it in), Datasette prints every error it answers, each 403 and 404
# included, as a rich traceback with the locals of every frame: 2.3 s of CPU per 404 on this
# machine instead of 9 ms, and "Traceback" in the server log that tests assert is absent.
raise ImportError("rich is hidden from the processes the datasette-sync tests start")
