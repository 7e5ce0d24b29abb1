"""The task contract (nfb.tasks.base.Task) and the counts that go through it: pure logic, no
engine. Expected values are written out by hand from the rows given."""

import importlib
import inspect
import pkgutil
from collections import Counter

import nfb.tasks
from nfb.config import SamplingConfig
from nfb.run.collect import RunResult
from nfb.tasks.base import Task
from nfb.tasks.feedback import FeedbackTask
from nfb.tasks.judge import JudgeTask
from nfb.tasks.multi import MultiResponse
from nfb.verbs.merge import merged_summary


def test_every_task_subclasses_the_contract():
    found = []
    for mod in pkgutil.iter_modules(nfb.tasks.__path__):
        m = importlib.import_module(f"nfb.tasks.{mod.name}")
        for name, cls in inspect.getmembers(m, inspect.isclass):
            if cls.__module__ == m.__name__ and hasattr(cls, "parse") and cls is not Task:
                found.append(name)
                assert issubclass(cls, Task), f"{name} does not subclass nfb.tasks.base.Task"
    assert {"FeedbackTask", "ScoreTask", "JudgeTask", "PrincipleTask", "PrincipleJudgeTask",
            "MultiResponse"} <= set(found)


def test_feedback_counts_levels_of_each_response():
    one = FeedbackTask(SamplingConfig())
    assert list(one.tally({"feedback_level": 4, "feedback": "x"})) == [("levels", 4)]
    assert list(one.tally({"feedback_level": None})) == []
    named = MultiResponse(FeedbackTask(SamplingConfig()), names=("chosen", "rejected"))
    assert named.tallied == ("chosen_feedback_level", "rejected_feedback_level")
    got = list(named.tally({"chosen_feedback_level": 5, "rejected_feedback_level": 2,
                            "chosen_feedback": "a", "rejected_feedback": "b"}))
    assert got == [("levels", 5), ("levels", 2)]
    listed = MultiResponse(FeedbackTask(SamplingConfig()), list_field="responses")
    got = list(listed.tally({"responses_feedback_level": [3, None, 3]}))
    assert got == [("levels", 3), ("levels", 3)]
    assert list(listed.tally({"responses_feedback_level": None})) == []


def test_judge_counts_unreadable_rows():
    task = JudgeTask(SamplingConfig())
    assert list(task.tally({"judge_error": "no_final_answer:..."})) == [("unreadable", None)]
    assert list(task.tally({"judge_error": None})) == []


def test_summary_keeps_its_shape_and_reads_back():
    r = RunResult("out.parquet", rows=3)
    for tallies in ([("levels", 4)], [("levels", 2)], [("levels", 4)], [("unreadable", None)]):
        r.add(tallies)
    s = r.summary()
    assert s["levels"] == {"2": 1, "4": 2} and s["unreadable"] == 1
    assert list(s)[:5] == ["rows", "error_rows", "errors", "levels", "unreadable"]
    back = RunResult.from_summary("out.parquet", s, Task.counts)
    assert back.levels == Counter({4: 2, 2: 1}) and back.unreadable == 1 and back.rows == 3
    empty = RunResult("x").summary()
    assert empty["levels"] == {} and empty["unreadable"] == 0


def test_merged_summary_adds_up_the_shards():
    a = {"rows": 3, "error_rows": 1, "errors": {"null_field": 1}, "levels": {"4": 2},
         "unreadable": 0, "notes": {"x": 1}, "data_parallel": 2}
    b = {"rows": 2, "error_rows": 0, "errors": {}, "levels": {"4": 1, "5": 1},
         "unreadable": 1, "data_parallel": 1, "truncated": 1}
    assert merged_summary([a, b]) == {"rows": 5, "error_rows": 1, "errors": {"null_field": 1},
                                      "levels": {"4": 3, "5": 1}, "unreadable": 1}
