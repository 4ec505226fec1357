import os
import sys

# Test helpers (tests/models.py, tests/dist.py) import as top-level modules, also in
# the processes the multi-rank harness spawns.
sys.path.insert(0, os.path.dirname(__file__))
