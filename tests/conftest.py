# Triton kernels run on the CPU through Triton's interpreter; this must be set before `import triton`.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# the repository root's modules (and extras/) import as they do for `python X.py` there
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="module", params=[False, True], ids=["tags-as-text", "tags-special"])
def ck(request, tmp_path_factory):
    """A tiny random checkpoint -> (model, tokenizer): the NPR tags as plain text, and as added tokens."""
    from helpers import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ck"), tags_special=request.param)
