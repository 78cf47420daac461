# Put first on the test processes' PYTHONPATH by conftest.py: ``import numpy`` fails, as on a
# machine without it. sqlite-utils imports numpy whenever it is installed (it only converts
# numpy values on insert, which nothing here does), and that import was a third of the CPU of
# every sqlite-utils and datasette process the suite starts.
raise ImportError("numpy is hidden from the processes the datasette-sync tests start")
