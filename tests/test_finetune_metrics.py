"""finetune.metrics / figures / report: metrics against hand-computed values and sklearn, PNGs that read back,
markdown tables in the paper's shape."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from finetune import figures, report
from finetune.metrics import (accuracy, balanced_accuracy, choose_threshold, classification_metrics,
                              mean_guess_metrics, regression_metrics, segmentation_metrics, volume_dice)
from pretrain.evaluate import retrieval_topk

# ------------------------------------------------------------------------------------------------- regression


def test_regression_metrics_hand_computed():
    true = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, 40.0]])
    pred = np.array([[1.0, 12.0], [3.0, 99.0], [2.0, 27.0], [5.0, 1e6]])
    valid = np.array([[True, True], [True, True], [True, True], [True, False]])  # row 3 of "b" masked out
    m = regression_metrics(pred, true, ["a", "b"], valid)
    # a: errors 0, 1, -1, 1
    a = m["a"]
    assert a["n"] == 4
    assert a["mae"] == pytest.approx(0.75) and a["rmse"] == pytest.approx(math.sqrt(0.75))
    assert a["mae_std"] == pytest.approx(np.std([0, 1, 1, 1]))
    assert a["r2"] == pytest.approx(1 - 3 / 5)  # SS_res 3, SS_tot 5
    assert a["pearson"] == pytest.approx(5.5 / math.sqrt(5 * 8.75))
    # b: the NaN target (row 1) and the masked row 3 drop out: rows 0 and 2, errors 2 and -3
    b = m["b"]
    assert b["n"] == 2 and b["mae"] == pytest.approx(2.5) and b["rmse"] == pytest.approx(math.sqrt(6.5))
    assert b["r2"] == pytest.approx(1 - 13 / 200) and b["pearson"] == pytest.approx(1.0)
    # torch input gives the same numbers
    assert regression_metrics(torch.tensor(pred), torch.tensor(true), ["a", "b"], torch.tensor(valid)) == m


def test_regression_metrics_undefined_and_shape_errors():
    m = regression_metrics(np.array([[1.0], [2.0]]), np.array([[np.nan], [np.nan]]), ["x"])["x"]
    assert m["n"] == 0 and math.isnan(m["mae"]) and math.isnan(m["r2"])
    m = regression_metrics(np.array([[1.0], [2.0]]), np.array([[3.0], [3.0]]), ["x"])["x"]  # constant target
    assert m["mae"] == pytest.approx(1.5) and math.isnan(m["r2"]) and math.isnan(m["pearson"])
    with pytest.raises(ValueError):
        regression_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["only_one"])


def test_mean_guess_predicts_the_training_mean():
    train = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])  # target "b" never measured in training
    test = np.array([[2.0, 5.0], [4.0, 6.0]])
    m = mean_guess_metrics(train, test, ["a", "b"])
    assert m["a"]["mae"] == pytest.approx(1.0)  # mean 2 (NaN ignored): errors 0 and 2
    assert m["a"]["r2"] == pytest.approx(1 - 4 / 2) and math.isnan(m["a"]["pearson"])  # constant prediction
    assert m["b"]["n"] == 0 and math.isnan(m["b"]["mae"])


# --------------------------------------------------------------------------------------------- classification


def test_choose_threshold_known_best_ties_and_degenerate():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    labels = [0, 0, 1, 0, 1, 1]
    # F1 at >= 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: 2/4, 4/5, 4/6, 6/7, 6/8, 6/9 -> 0.3
    assert choose_threshold(scores, labels) == pytest.approx(0.3)
    # an unknown label (-1) with the highest score must not count as a false positive
    assert choose_threshold(scores + [0.9], labels + [-1]) == pytest.approx(0.3)
    # F1 2/3 at both 0.4 (1 TP) and 0.1 (2 TP, 2 FP): the larger threshold wins
    assert choose_threshold([0.1, 0.2, 0.3, 0.4], [1, 0, 0, 1]) == pytest.approx(0.4)
    # tied scores are one threshold: >= 0.5 takes both 0.5s
    assert choose_threshold([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.5)
    assert choose_threshold([0.9, 0.8, 0.6], [1, 0, 1]) == pytest.approx(0.6)  # 4/5 beats 2/3
    # one class only: nothing to choose from
    assert choose_threshold([0.1, 0.9], [0, 0]) == 0.5
    assert choose_threshold([0.1, 0.9], [1, 1], default=0.0) == 0.0
    assert choose_threshold([0.1, 0.9], [-1, -1]) == 0.5


def test_classification_metrics_match_sklearn_and_exclude_unknown():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = labels * 0.8 + rng.normal(0, 0.6, 300)
    labels[::7] = -1
    m = classification_metrics(scores, labels, threshold=0.4)
    keep = labels >= 0
    y, s = labels[keep], scores[keep]
    pred = (s >= 0.4).astype(int)
    assert m["n"] == keep.sum() and m["prevalence"] == pytest.approx(y.mean()) and m["threshold"] == 0.4
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["ap"] == pytest.approx(skm.average_precision_score(y, s))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    # the unknowns really are excluded: treating them as negatives changes the AUROC
    assert m["auroc"] != pytest.approx(skm.roc_auc_score(np.maximum(labels, 0), scores))


def test_rare_disease_gets_nonzero_f1_with_validation_threshold():
    """5 % prevalence, well separated but low probabilities: 0.5 finds nothing, the validation threshold does."""
    rng = np.random.default_rng(1)

    def split(n):
        y = (rng.random(n) < 0.05).astype(int)
        logit = np.where(y == 1, -1.5 + rng.normal(0, 0.3, n), -4.0 + rng.normal(0, 0.7, n))
        return 1 / (1 + np.exp(-logit)), y  # positives around p = 0.18: all below 0.5

    (val_s, val_y), (test_s, test_y) = split(600), split(600)
    assert classification_metrics(test_s, test_y, 0.5)["f1"] == 0.0  # the ResNet-50 rows of Table 4
    m = classification_metrics(test_s, test_y, choose_threshold(val_s, val_y))
    assert 0.02 < m["prevalence"] < 0.08
    assert m["f1"] > 0.7 and m["recall"] > 0.7 and m["auroc"] > 0.95


def test_auroc_is_nan_for_a_single_class():
    m = classification_metrics([0.2, 0.7, 0.9], [0, 0, -1], 0.5)
    assert math.isnan(m["auroc"]) and math.isnan(m["ap"]) and m["n"] == 2 and m["prevalence"] == 0.0
    assert m["f1"] == 0.0 and m["precision"] == 0.0  # one false positive, zero_division handled
    m = classification_metrics([0.2, 0.7], [1, 1], 0.5)
    assert math.isnan(m["auroc"]) and m["ap"] == pytest.approx(1.0) and m["recall"] == 0.5


def test_accuracy_and_balanced_accuracy():
    true = np.array([0, 0, 0, 0, 1, 2])
    pred = np.array([0, 0, 0, 0, 0, 2])
    assert accuracy(pred, true) == pytest.approx(5 / 6)
    assert balanced_accuracy(pred, true) == pytest.approx((1 + 0 + 1) / 3)
    logits = np.eye(3)[pred] * 2.0  # (N, C) scores: argmax taken
    assert accuracy(torch.tensor(logits), torch.tensor(true)) == pytest.approx(5 / 6)


# ----------------------------------------------------------------------------------------------- segmentation

LABELS = {1: "LV", 2: "MYO", 3: "RV"}


def _square(y: int, x: int, side: int = 10, size: int = 32, label: int = 1) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[y:y + side, x:x + side] = label
    return m


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dice_and_hd95_of_shifted_squares(k):
    """10x10 squares offset by k columns: Dice (10 - k) / 10; HD95 = k pixels (k * column spacing in mm)."""
    true = _square(8, 8)[None, None, None]
    pred = _square(8, 8 + k)[None, None, None]
    valid = np.ones((1, 1), bool)
    m = segmentation_metrics(pred, true, valid, {1: "LV"})["LV"]
    assert m["dice"] == pytest.approx((10 - k) / 10) and m["hd95"] == pytest.approx(k)
    assert m["n"] == 1 and m["n_hd95"] == 1
    mm = segmentation_metrics(pred, true, valid, {1: "LV"}, spacing=(1.5, 2.0))["LV"]
    assert mm["dice"] == pytest.approx(m["dice"]) and mm["hd95"] == pytest.approx(2.0 * k)


def _seg_case():
    """(N=2, P=2, T=2, 32, 32); plane (0, 1) has no ground truth and is filled with garbage."""
    true = np.zeros((2, 2, 2, 32, 32), np.uint8)
    pred = np.zeros_like(true)
    true[0, 0, :] = _square(8, 8)
    pred[0, 0, :] = _square(8, 10)  # LV shifted by 2 in both frames: Dice 0.8, HD95 2
    true[1, 0, :] = _square(4, 4)
    pred[1, 0, 0] = _square(4, 4)  # frame 0 exact: Dice 1, HD95 0; frame 1: LV missed (Dice 0, no HD)
    pred[1, 1, 0] = _square(20, 20, label=3)  # RV predicted where truth has none: Dice 0; LV absent in both
    true[0, 1] = np.random.default_rng(0).integers(0, 4, (2, 32, 32))
    pred[0, 1] = np.random.default_rng(1).integers(0, 4, (2, 32, 32))
    valid = np.array([[True, False], [True, True]])
    return pred, true, valid


def test_segmentation_metrics_absent_structures_and_counts():
    pred, true, valid = _seg_case()
    m = segmentation_metrics(pred, true, valid, LABELS)
    # LV items: 0.8, 0.8, 1, 0 (missed); HD over the three with both present; the LV-free plane (1, 1) excluded
    assert m["LV"]["n"] == 4 and m["LV"]["dice"] == pytest.approx(0.65)
    assert m["LV"]["n_hd95"] == 3 and m["LV"]["hd95"] == pytest.approx(4 / 3)
    assert m["RV"] == {"dice": 0.0, "hd95": pytest.approx(float("nan"), nan_ok=True), "n": 1, "n_hd95": 0}
    assert m["MYO"]["n"] == 0 and math.isnan(m["MYO"]["dice"]) and math.isnan(m["MYO"]["hd95"])


def test_segmentation_invalid_planes_are_excluded():
    pred, true, valid = _seg_case()
    ref = segmentation_metrics(pred, true, valid, LABELS)
    pred2, true2 = pred.copy(), true.copy()
    pred2[0, 1] = 0
    true2[0, 1] = 3
    same = segmentation_metrics(torch.tensor(pred2), torch.tensor(true2), torch.tensor(valid), LABELS)
    np.testing.assert_equal(same, ref)  # nested dicts, NaN == NaN
    # the garbage plane would change the result if it counted
    assert segmentation_metrics(pred, true, np.ones_like(valid), LABELS)["MYO"]["n"] > 0


def test_segmentation_rejects_bad_shapes():
    with pytest.raises(ValueError):
        segmentation_metrics(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)), np.ones((1, 1), bool), LABELS)


# -------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_topk_hand_made():
    def unit(deg, norm=1.0):
        return norm * np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])

    gallery = np.stack([unit(0), unit(30), unit(90), unit(180, norm=100.0)])  # cosine must ignore the norm of g3
    query = np.stack([unit(0), unit(100), unit(20), unit(45)])
    # rankings: q0 g0 g1 g2 g3 | q1 g2 g1 g3 g0 | q2 g1 g0 g2 g3 | q3 has no correct item
    match = np.zeros((4, 4), bool)
    match[0, 0] = match[1, 1] = match[2, 3] = True
    r = retrieval_topk(query, gallery, match, ks=(1, 2, 3, 10))
    assert r == {"top1": 0.25, "top2": 0.5, "top3": 0.5, "top10": 0.75, "n": 4}
    assert retrieval_topk(torch.tensor(query), torch.tensor(gallery), match)["top1"] == 0.25
    with pytest.raises(ValueError):
        retrieval_topk(query, gallery, match[:, :3])


# ---------------------------------------------------------------------------------------------------- figures


def _assert_png(path, tmp_path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)
    assert img.std() > 0  # something was drawn
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_figures_write_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.normal(100, 20, (40, 3))
    pred = true + rng.normal(0, 5, (40, 3))
    true[3, 1] = np.nan
    _assert_png(figures.regression_scatter(pred, true, ["LVEDV", "LVEF", "LVM"], ["mL", "%", "g"],
                                           tmp_path / "scatter.png"), tmp_path)

    y = {"cad": (rng.random(80) < 0.2).astype(int), "stroke": np.zeros(80, int)}  # stroke: one class only
    s = {k: v + rng.normal(0, 0.5, 80) for k, v in y.items()}
    _assert_png(figures.roc_pr_curves(s, y, tmp_path / "roc_pr.png"), tmp_path)

    images = rng.random((3, 32, 32))
    truth = np.stack([_square(8, 8, label=lab) for lab in (1, 3, 4)])
    seg = np.stack([_square(9, 8, label=lab) for lab in (1, 3, 5)])
    _assert_png(figures.segmentation_overlay(images, truth, seg, ["SA mid", "4ch", "2ch"], tmp_path / "seg.png"),
                tmp_path)

    emb = rng.normal(size=(6, 8))  # tiny N: perplexity (6 - 1) / 3
    values = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    _assert_png(figures.tsne_embedding(emb, values, "LVEF", tmp_path / "tsne.png"), tmp_path)

    rows = [{"step": i, "loss": 1 / (i + 1), "val_mae": 5 - i * 0.1} for i in range(10)] + [{"step": 10, "lr": 1e-6}]
    out = figures.training_curves(rows, ["loss", "val_mae", "lr"], tmp_path / "sub" / "curves.png")
    _assert_png(out, tmp_path / "sub")


def test_figures_reject_bad_input(tmp_path):
    with pytest.raises(ValueError):
        figures.tsne_embedding(np.zeros((4, 3)), np.zeros(4), "x", tmp_path / "t.png")
    with pytest.raises(ValueError):
        figures.segmentation_overlay(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), ["one"],
                                     tmp_path / "s.png")


# ----------------------------------------------------------------------------------------------------- report


def test_markdown_table_formatting():
    rows = [{"method": "ViTa", "mae": 1.23456, "n": 10, "note": "a|b"}, {"method": "mean", "mae": float("nan")}]
    assert report.markdown_table(rows, ["method", "mae", "n", "note"], floatfmt=".2f") == (
        "| method | mae | n | note |\n"
        "|---|---|---|---|\n"
        "| ViTa | 1.23 | 10 | a\\|b |\n"
        "| mean | n.a. |  |  |\n")


def test_paper_shaped_tables():
    pheno = {"Mean-guess": {"LVEDV": {"mae": 25.0, "mae_std": 20.0}, "LVEF": {"mae": 5.0, "mae_std": 4.0}},
             "ViTa": {"LVEDV": {"mae": 6.0, "mae_std": 8.0}, "LVEF": {"mae": float("nan"), "mae_std": float("nan")}}}
    t = report.phenotype_table(pheno, ["LVEDV", "LVEF"]).splitlines()
    assert t[0] == "| Method | LVEDV | LVEF | Average |"
    assert t[2] == "| Mean-guess | 25.000 ± 20.000 | 5.000 ± 4.000 | 15.000 ± 12.000 |"
    assert t[3] == "| ViTa | 6.000 ± 8.000 | n.a. | 6.000 ± 8.000 |"  # averaged over the available phenotypes

    cls = {"ResNet-50": {"cad": {"auroc": 0.608, "f1": 0.0, "recall": 0.0, "precision": 0.0, "ap": 0.139,
                                 "prevalence": 0.074}},
           "ViTa": {"cad": {"auroc": 0.77, "f1": 0.312, "recall": 0.233, "precision": 0.472, "ap": 0.333,
                            "prevalence": 0.074}}}
    t = report.disease_table(cls).splitlines()
    assert t[0] == "| Disease | Method | AUROC | F1 | Recall | Precision | AP |"
    assert t[2] == "| cad (7.4%) | ResNet-50 | 0.608 | 0.000 | 0.000 | 0.000 | 0.139 |"
    assert t[3] == "|  | ViTa | 0.770 | 0.312 | 0.233 | 0.472 | 0.333 |"
    cls["ResNet-50"]["cad"]["n"] = 27  # with the count of labelled subjects: the positives are shown
    assert report.disease_table(cls).splitlines()[2].startswith("| cad (2/27, 7.4%) | ResNet-50 |")

    seg = {"ViTa": {"LV": {"dice": 0.9, "hd95": 2.5}, "RA": {"dice": 0.8, "hd95": float("nan")}}}
    t = report.segmentation_table(seg).splitlines()
    assert t[0] == "| Method | LV Dice | LV HD95 | RA Dice | RA HD95 |"
    assert t[2] == "| ViTa | 0.900 | 2.500 | 0.800 | n.a. |"


def test_write_report_links_figures_and_leaves_no_temp(tmp_path):
    fig = figures.training_curves([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], ["loss"],
                                  tmp_path / "figures" / "curves.png")
    out = report.write_report(tmp_path / "report.md", "Fine-tuning", [("Phenotypes", "| a |\n|---|\n| 1 |\n")],
                              [fig])
    text = out.read_text()
    assert text.startswith("# Fine-tuning\n") and "## Phenotypes\n\n| a |" in text
    assert "![curves](figures/curves.png)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "report.md"]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["curves.png"]


def test_volume_dice_hand_made_masks():
    """Dice over each subject's volume (SA stack pooled, LA views each on its own), hand-computed; a structure is
    scored only on planes whose ground truth can hold it; absent in both -> left out; absent in one -> 0."""
    # 1 subject, planes: sa_0, sa_1, la_2ch, la_4ch; 2 frames of 4 x 4
    true = np.zeros((1, 4, 2, 4, 4), np.uint8)
    pred = np.zeros_like(true)
    true[0, 0, :, :2, :2] = 1  # LV: 4 px x 2 frames on sa_0
    true[0, 1, 0, :2, :2] = 1  # and 4 px on sa_1 frame 0  -> 12 px in the SA volume
    pred[0, 0, :, :2, :2] = 1  # 8 px overlap on sa_0
    pred[0, 1, 1, :2, :2] = 1  # 4 px on sa_1 frame 1, no overlap  -> pred 12 px, overlap 8
    pred[0, 2, :, :2, :2] = 1  # LV predicted on the 2-chamber view: its ground truth has no LV, never counted
    true[0, 3, 0, 2:, 2:] = 5  # RA on the 4-chamber view, missed entirely -> 0
    true[0, 2, :, 0, 0] = 4  # LA on the 2-chamber view, found exactly -> 1
    pred[0, 2, :, 0, 0] = 4
    labels = {1: "LV", 2: "MYO", 4: "LA", 5: "RA"}
    plane_labels = [(1, 2, 3), (1, 2, 3), (4,), (4, 5)]
    groups = [0, 0, 1, 2]
    res = volume_dice(pred, true, np.ones((1, 4), bool), labels, plane_labels, groups)
    assert res["LV"]["dice"] == pytest.approx(2 * 8 / (12 + 12)) and res["LV"]["n"] == 1
    assert math.isnan(res["MYO"]["dice"]) and res["MYO"]["n"] == 0  # absent in both: undefined, left out
    assert res["LA"]["n"] == 1 and res["LA"]["dice"] == 1.0  # the 4-chamber view has no LA in either: left out
    assert res["RA"]["dice"] == 0.0 and res["RA"]["n"] == 1
    # a spurious structure on a plane labelled with it counts as 0
    pred2 = pred.copy()
    pred2[0, 3, 1, 0, 0] = 4
    assert volume_dice(pred2, true, np.ones((1, 4), bool), labels, plane_labels, groups)["LA"]["n"] == 2
    # an unlabelled plane (valid False) is not scored at all
    valid = np.array([[True, True, False, True]])
    assert volume_dice(pred, true, valid, labels, plane_labels, groups)["LA"]["n"] == 0
    # the per-frame metric with the same label sets no longer scores the LV predicted on the 2-chamber view
    frame = segmentation_metrics(pred, true, np.ones((1, 4), bool), {1: "LV"}, plane_labels=plane_labels)
    assert frame["LV"]["n"] == 4  # sa_0 f0, f1 (both present), sa_1 f0 (missed), f1 (spurious); not la_2ch
    assert segmentation_metrics(pred, true, np.ones((1, 4), bool), {1: "LV"})["LV"]["n"] == 6
    with pytest.raises(ValueError):
        volume_dice(pred, true, np.ones((1, 3), bool), labels, plane_labels, groups)


def test_phenotype_reference_reads_a_disease_written_in_the_phenotypes():
    """The diseases' reference (a logistic regression on the stored phenotypes) finds a disease defined by a low
    LVEF, ignores missing values, and gives NaN for a disease with one class in training."""
    from types import SimpleNamespace

    from core.vocab import PHENOTYPES
    from finetune.config import FinetuneConfig
    from finetune.tasks.diseases import phenotype_reference

    rng = np.random.default_rng(0)
    ef = PHENOTYPES.index("LVEF")

    def split(n):
        x = rng.normal(100, 20, (n, len(PHENOTYPES))).astype(np.float32)
        x[rng.random(x.shape) < 0.05] = np.nan  # some measurements missing
        x[:, ef] = rng.normal(58, 8, n)
        y = np.stack([(x[:, ef] < 52).astype(np.int64), np.zeros(n, np.int64)], axis=1)
        y[::7, 0] = -1  # unknown labels stay out
        return SimpleNamespace(phenotypes_table=lambda: x, diseases_table=lambda: y)

    cfg = FinetuneConfig()
    cfg.task.diseases = ["hf", "never"]
    ref = phenotype_reference(cfg, {"train": split(80), "test": split(60)})
    assert ref["per_disease"]["hf"]["auroc"] > 0.85  # 0.92 measured; chance 0.5
    assert ref["per_disease"]["hf"]["n"] == 60 - len(range(0, 60, 7))
    assert math.isnan(ref["per_disease"]["never"]["auroc"])  # one class in the test split too
    one_class = split(60)
    one_class.diseases_table()[:, 0] = 0  # no positive in training: the prevalence, scored like mean-guess
    ref = phenotype_reference(cfg, {"train": one_class, "test": split(60)})
    assert ref["per_disease"]["hf"]["auroc"] == 0.5


def test_named_validation_scalars_per_task():
    from finetune.tasks import get_task

    def val_scalars(task, val):
        return get_task(task).val_scalars(val)

    seg = {"volume_dice": {"LV": {"dice": 0.9}, "RA": {"dice": float("nan")}}, "primary": 0.9}
    assert val_scalars("segmentation", seg) == {"dice_LV": 0.9}  # NaN (no such structure) left out
    dis = {"per_disease": {"cad": {"auroc": 0.8}, "stroke": {"auroc": 0.6}, "x": {"auroc": float("nan")}}}
    assert val_scalars("diseases", dis) == pytest.approx({"auroc_cad": 0.8, "auroc_stroke": 0.6, "auroc_mean": 0.7})
    assert val_scalars("phenotypes", {"per_target": {"LVEDV": {"mae": 12.5}}}) == {"mae_LVEDV": 12.5}
    mv = {"modality_accuracy": 0.9, "view_balanced_accuracy": 0.8, "primary": 0.85}
    assert val_scalars("modality_view", mv) == {"modality_accuracy": 0.9, "view_balanced_accuracy": 0.8}


def test_case_level_3d_dice_equals_monai_on_hand_made_volumes():
    """MetaCLIP-CMR scores segmentation by case-level 3D Dice (per case, per structure over the whole short-axis
    stack, then the mean over cases): `volume_dice` with one stack per case computes it, as MONAI's `compute_dice`
    does on the same one-hot volumes."""
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    n, z, h, w = 4, 5, 16, 16
    true = np.zeros((n, 1, z, h, w), np.uint8)
    pred = np.zeros_like(true)
    for i in range(n):  # three nested boxes per case, the prediction shifted by a case-dependent amount
        for lab, r in ((2, 6), (1, 4), (3, 2)):
            c = 8 + int(rng.integers(-1, 2))
            true[i, 0, 1:4, c - r:c + r, c - r:c + r] = lab
            s = i % 3
            pred[i, 0, 1:4 + (i % 2), c - r + s:c + r + s, c - r:c + r] = lab
    labels = {1: "LV", 2: "MYO", 3: "RV"}
    ours = volume_dice(pred, true, np.ones((n, 1), bool), labels, [(1, 2, 3)], [0])
    onehot = lambda a: np.eye(4, dtype=np.float32)[a[:, 0]].transpose(0, 4, 1, 2, 3)  # noqa: E731 (N, 4, Z, H, W)
    monai = compute_dice(torch.from_numpy(onehot(pred)), torch.from_numpy(onehot(true)), include_background=False)
    assert monai.shape == (n, 3)
    for c, name in labels.items():
        assert ours[name]["n"] == n
        assert ours[name]["dice"] == pytest.approx(float(monai[:, c - 1].mean()), abs=1e-6), name
    assert 0.3 < ours["LV"]["dice"] < 0.99  # the shifts make a difference that could be wrong
