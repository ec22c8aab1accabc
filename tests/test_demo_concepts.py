"""Issue 15 item 4 on a real `sail demo` run: planted concepts beside their controls.

Slow: `pytest -m slow tests/test_demo_concepts.py` (the whole demo: phantom, both encoders, the
demo grid, evaluate, interpret, report). Protocol: the config the ranking chose on valid, the
feature chosen on train, ROC-AUC on test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sail.config import load_config
from sail.evaluate.concepts import chosen_configs
from sail.pipeline import demo_config_path, run_pipeline
from sail.report.selection import planted_labels

pytestmark = pytest.mark.slow

PRETRAINED, CONTROL = "efficientnet-lite0", "random-efficientnet-lite0"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = load_config(demo_config_path(), {"workspace": tmp_path_factory.mktemp("demo")})
    ws = run_pipeline(cfg)
    concepts = pd.read_csv(ws.eval_dir / "concepts.csv", dtype={"sae_config": str})
    ranking = pd.read_csv(ws.eval_dir / "ranking.csv", dtype={"sae_config": str})
    chosen = chosen_configs(ranking, cfg.train.variants)

    def table(encoder):
        variant, config = chosen[encoder]
        rows = concepts[
            (concepts.encoder == encoder)
            & (concepts.variant == variant)
            & (concepts.sae_config == config)
        ]
        return rows.set_index("label").reindex(planted_labels(cfg))

    return cfg, ws, table(PRETRAINED), table(CONTROL)


def test_every_planted_label_stands_beside_its_controls(demo):
    _, ws, pretrained, control = demo
    assert pretrained["test_roc_auc"].notna().all(), "every planted label is defined on test"
    for col in ("raw_test_roc_auc", "null_test_roc_auc", "control_test_roc_auc"):
        assert pretrained[col].notna().all(), col
    assert (pretrained["control_encoder"] == CONTROL).all()
    np.testing.assert_allclose(pretrained["control_test_roc_auc"], control["test_roc_auc"])
    assert abs(pretrained["null_test_roc_auc"].median() - 0.5) < 0.1
    html = (ws.report_dir / "index.html").read_text()
    assert html.index("Planted concepts") < html.index("SAE configurations")


def test_pretrained_encoder_beats_its_random_init_control(demo):
    _, _, pretrained, control = demo
    assert pretrained["test_roc_auc"].median() > control["test_roc_auc"].median()


@pytest.mark.xfail(
    strict=True,
    reason="issue 15 acceptance not reached yet: 2 of 14 planted labels reach 0.90 with one SAE "
    "feature on the demo (median 0.76, best raw dimension 0.81, linear probe 0.96; within CT axial "
    "slices alone 0.91): single features are plane-specific (docs/demo_concepts.md)",
)
def test_a_single_sae_feature_finds_most_planted_concepts(demo):
    _, _, pretrained, _ = demo
    assert (pretrained["test_roc_auc"] >= 0.90).sum() >= 10
