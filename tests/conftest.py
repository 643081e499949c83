import os
import sys

# Tests import the project's top-level modules (admm, models, ...) and the test helpers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
