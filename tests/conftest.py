# Triton kernels run on the CPU through Triton's interpreter; this must be set before `import triton`.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# the repository root's modules (and extras/) import as they do for `python X.py` there
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
