"""glue's shared page blocks (issue 19): downloads, run manifests and metric rows, as the pages use them."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import glue
from probing_core.models import ModelSpec, load_model, tiny_native_config

ROWS = [{"hook": "hook_embed", "r2": 0.5}, {"hook": "blocks.0.hook_resid_post", "r2": float("nan")}]


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec.native(tiny_native_config()))


def test_download_data_is_what_the_pages_built_by_hand():
    assert glue.download_data(ROWS) == pd.DataFrame(ROWS).to_csv(index=False)
    assert glue.download_data(pd.DataFrame(ROWS)) == pd.DataFrame(ROWS).to_csv(index=False)
    doc = {"a": np.float32(0.25), "b": [1, 2], "c": None}
    assert glue.download_data(doc) == json.dumps(doc, indent=1, default=str)
    assert json.loads(glue.download_data(doc)) == {"a": "0.25", "b": [1, 2], "c": None}  # never a TypeError
    assert glue.download_data(b"\x93NUMPY") == b"\x93NUMPY" and glue.download_data("x,y\n") == "x,y\n"


def test_run_manifest_merges_the_cores_manifest_like_the_regression_page_did(tiny):
    core = {"analysis": "ridge", "model": {"key": "old"}, "versions": {"numpy": "2", "torch": "old"}, "alphas": [1.0]}
    base = glue.manifest_base(tiny)
    want = {**core, **base, "versions": {**core["versions"], **base["versions"]}, "page": "regression", "alpha_shown": 1.0}
    got = glue.run_manifest(tiny, core=core, page="regression", alpha_shown=1.0)
    assert got == want and list(got) == list(want)  # same keys in the same order: the same JSON text
    assert got["versions"]["numpy"] == "2" and got["versions"]["torch"] == base["versions"]["torch"]
    assert glue.run_manifest(tiny, page="logit lens", view="Next token") == {**base, "page": "logit lens", "view": "Next token"}


def _blocks_script() -> None:
    import glue

    glue.metric_row(("A", "1"), ("B", 2, {"help": "n = 3", "delta": "chance 0.5", "delta_color": "off"}))
    glue.downloads(("⬇ rows (CSV)", [{"x": 1}], "t.csv", "k_csv"), ("⬇ doc (JSON)", {"y": 2}, "t.json", "k_json"),
                   ("⬇ zip", b"PK", "t.zip", "k_zip"), ("⬇ raw", b"\x93NUMPY", "t.npy", "k_npy"))
    glue.verdict(True, "holds")
    glue.verdict(False, "does not")


def test_metric_row_downloads_and_verdicts_render():
    at = AppTest.from_function(_blocks_script, default_timeout=60).run()
    assert not at.exception, at.exception
    assert [(m.label, m.value) for m in at.metric] == [("A", "1"), ("B", "2")]
    assert at.metric[1].help == "n = 3" and at.metric[1].proto.delta == "chance 0.5"
    buttons = [b.proto for b in at.get("download_button")]
    assert [b.label for b in buttons] == ["⬇ rows (CSV)", "⬇ doc (JSON)", "⬇ zip", "⬇ raw"]
    # the media URL's extension follows the MIME type glue chose from the file name
    assert [b.url.rsplit(".", 1)[1] for b in buttons[:3]] == ["csv", "json", "zip"]
    assert [s.value for s in at.success] == ["holds"] and [w.value for w in at.warning] == ["does not"]
