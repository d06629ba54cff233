"""benchmarks/efficacy.py's train and test sides on the real records: disjoint, and PubMedQA's test side
is exactly the published test PMIDs present. (The benchmark itself runs for minutes: `make bench`.)"""

from __future__ import annotations

import argparse
import json
import runpy

from conftest import REAL_DATA, REPO, requires_real_data

from clinalign import tasks
from clinalign.data import count_overlap


@requires_real_data
def test_sides_are_disjoint_and_pubmedqa_tests_the_published_pmids():
    efficacy = runpy.run_path(str(REPO / "benchmarks" / "efficacy.py"), run_name="efficacy_test")
    sides = efficacy["sides"](argparse.Namespace(data=str(REAL_DATA), train=[], test=[]))
    assert set(sides) == {"pubmedqa", "medmcqa", "medqa"}
    test_pmids = set(json.loads((REAL_DATA / efficacy["PUBMEDQA_TEST_IDS"]).read_text()))
    for family, (train, test) in sides.items():
        assert len(train) >= 100 and len(test) >= 100, (family, len(train), len(test))
        assert not {tasks.task_of(r).key(r) for r in train} & {tasks.task_of(r).key(r) for r in test}
        assert count_overlap(train, test)["same_question_and_options"] == 0, family
    train, test = sides["pubmedqa"]
    assert {r.id for r in test} <= test_pmids and not {r.id for r in train} & test_pmids
