"""The examples in docstrings are run, so they stay true."""

import doctest
import importlib

import pytest

MODULES = ["cache_core.schema", "cache_core.settings", "cache_core.celeryconf", "cache_core.testing",
           "cache_core.policy", "web.inflight", "benchmarks.report", "cache_core.judge", "cache_core.judge_llm",
           "worker.judging", "cache_core.cache", "cache_core.grouping", "cache_core.evaluation", "worker.tasks",
           "benchmarks.quality_summary", "web.forms"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    failures, tried = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
