import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# no network in tests: a Hub id that is not in the local cache fails at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tests import helper modules from tests/ (e.g. tests/slurm_cluster.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))
