# conftest.py puts this folder first on the PYTHONPATH of the processes the tests start, so
# ``import numpy`` fails there as on a machine without it. sqlite-utils imports numpy whenever
# it is installed (only to convert numpy values on insert, which nothing here does), and that
# import was a third of the CPU of every sqlite-utils and datasette process the suite starts.
raise ImportError("numpy is hidden from the processes the datasette-sync tests start")
