"""The hard retrieval protocol (twins, 5 captions per image), multi-caption training (image-id ITC targets and ITM
negatives), the bootstrap confidence intervals and the uniform-split baseline."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from efficientvlm.training.data.collators import RetrievalCollator
from efficientvlm.training.data.retrieval_dataset import SyntheticRetrievalDataset, make_twin_retrieval_eval_set
from efficientvlm.training.data.scene_language import parse_statement
from efficientvlm.training.data.scene_world import random_scene, statement_is_true, swap_attributes_scene
from efficientvlm.training.method import losses as L
from efficientvlm.training.method.arguments import DistillationArguments, PruningArguments
from efficientvlm.training.method.l0 import ModalL0Module
from efficientvlm.training.metrics.confidence import PerQueryRanks, paired_r_mean_difference, r_mean_ci
from efficientvlm.training.metrics.retrieval_ranks import recall_metrics, retrieval_metrics
from efficientvlm.training.tasks import retrieval as R
from tests.conftest import tiny_config
from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher


# ------------------------------------------------------------------------------------------------- the protocol
@pytest.fixture(scope="module")
def twin_set():
    return make_twin_retrieval_eval_set(48, seed=3, image_size=32, return_scenes=True)


def test_twin_set_five_distinct_captions_each_true_only_of_its_own_image(twin_set):
    scenes, captions = twin_set["scenes"], twin_set["captions"]
    assert len(scenes) == 48 and len(captions) == 48 * 5 and len(set(captions)) == len(captions)
    for image, texts in enumerate(twin_set["img2txt"]):
        assert len(texts) == 5
        for text in texts:
            assert twin_set["txt2img"][text] == image
            structure = parse_statement(captions[text])
            # true of its own image, false of every other image of the set (twins included)
            assert [statement_is_true(s, structure) for s in scenes].count(True) == 1
            assert statement_is_true(scenes[image], structure)


def test_every_image_has_three_twins_that_really_differ(twin_set):
    scenes, kinds = twin_set["scenes"], twin_set["twin_kinds"]
    assert kinds[:4] == ["original", "rearranged", "swapped", "rearranged"]
    for image, twins in enumerate(twin_set["twins"]):
        assert len(twins) == 3 and image not in twins
        group = sorted([image, *twins])
        assert group == list(range(group[0], group[0] + 4))  # a group is 4 consecutive images
        words = sorted(w for o in scenes[image].objects for w in o.kind)
        for twin in twins:
            # the same bag of attribute words, a different scene: only binding and relations separate them
            assert sorted(w for o in scenes[twin].objects for w in o.kind) == words
            layout = {(o.kind, o.x, o.y) for o in scenes[twin].objects}
            assert layout != {(o.kind, o.x, o.y) for o in scenes[image].objects}


def test_swapped_twin_keeps_cells_and_words_but_changes_the_objects():
    rng = random.Random(0)
    found = 0
    for _ in range(50):
        scene = random_scene(rng, 3, 5)
        twin = swap_attributes_scene(rng, scene)
        if twin is None:  # possible (every tried swap exchanged two objects' places): the set generator redraws
            continue
        found += 1
        assert [(o.x, o.y) for o in twin.objects] == [(o.x, o.y) for o in scene.objects]
        assert sorted(o.kind for o in twin.objects) != sorted(o.kind for o in scene.objects)
    assert found >= 40


def test_twin_set_is_a_pure_function_and_checks_its_size():
    a = make_twin_retrieval_eval_set(8, seed=1, image_size=32)
    b = make_twin_retrieval_eval_set(8, seed=1, image_size=32)
    assert a["captions"] == b["captions"] and a["twins"] == b["twins"]
    short = make_twin_retrieval_eval_set(6, seed=1, image_size=32)  # one whole group and one of 2
    assert [len(t) for t in short["twins"]] == [3, 3, 3, 3, 1, 1] and len(short["captions"]) == 30
    with pytest.raises(ValueError, match="n_images >= 1"):
        make_twin_retrieval_eval_set(0)


def test_text_retrieval_counts_any_of_five_captions():
    # 2 images × 5 captions; image 0's best caption is its 4th (index 3), which ranks first: TR@1 hit
    scores = np.zeros((2, 10))
    scores[0, 3], scores[0, 5] = 1.0, 0.5
    scores[1, 9], scores[1, 0] = 1.0, 0.9
    img2txt, txt2img = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [0] * 5 + [1] * 5
    metrics = retrieval_metrics(scores, img2txt, txt2img)
    assert metrics["txt_r1"] == 100.0
    # image retrieval is per caption: only captions 3 and 9 score their image strictly first (0 prefers image 1,
    # 5 prefers image 0, the six all-zero columns tie and ties count against the ground truth)
    assert metrics["img_r1"] == pytest.approx(100 * 2 / 10)


def test_twin_accuracy_counts_own_image_above_each_twin():
    # 4 images (one group), one caption each; caption i is closest to image i, except caption 3 prefers image 2
    image_embeds = torch.eye(4)
    text_embeds = torch.eye(4)
    text_embeds[3] = torch.tensor([0.0, 0.0, 1.0, 0.5])
    twins = [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    out = R._twin_accuracy(None, twins, [0, 1, 2, 3], image_embeds, text_embeds, use_itm=False)
    # 12 comparisons; caption 3 loses to twin 2 and beats twins 0, 1: 11 of 12 won
    assert out["twin_accuracy"] == out["twin_accuracy_itc"] == pytest.approx(100 * 11 / 12)
    # by kind of pair: image 3 is the attribute-swapped twin, so every pair with image 3 is "swapped" (6 of them:
    # caption 3 against 0, 1, 2 — one lost — and captions 0, 1, 2 against image 3, all won); the other 6 rearranged
    kinds = ["original", "rearranged", "rearranged", "swapped"]
    out = R._twin_accuracy(None, twins, [0, 1, 2, 3], image_embeds, text_embeds, use_itm=False, twin_kinds=kinds)
    assert out["twin_accuracy_swapped"] == pytest.approx(100 * 5 / 6) and out["twin_accuracy_rearranged"] == 100.0


# ---------------------------------------------------------------------------------------- multi-caption training
def test_soft_itc_targets_hand_computed():
    """Two captions of image 0 and one of image 1: rows of image 0 target both of its captions (½ each)."""
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # row 1 repeats image 0 (its second caption)
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    ids = torch.tensor([7, 7, 9])
    sim = [[1.0, 0.6, 0.0], [1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]  # τ = 1

    def soft_ce(row, targets):
        log_z = math.log(sum(math.exp(x) for x in row))
        return -sum(t * (x - log_z) for x, t in zip(row, targets))

    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    cols = [[sim[i][j] for i in range(3)] for j in range(3)]
    expected = (sum(soft_ce(sim[i], targets[i]) for i in range(3)) / 3
                + sum(soft_ce(cols[j], targets[j]) for j in range(3)) / 3) / 2
    got = L.itc_loss(image, text, 1.0, positive_mask=L.same_image_mask(ids))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # distinct ids give the one-hot loss exactly
    distinct = L.itc_loss(image, text, 1.0, positive_mask=L.same_image_mask(torch.tensor([1, 2, 3])))
    assert float(distinct) == pytest.approx(float(L.itc_loss(image, text, 1.0)), rel=1e-6)


def test_global_itc_with_ids_equals_local_soft_itc_on_one_rank():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 2])
    local = L.itc_loss(image, text, 0.1, positive_mask=L.same_image_mask(ids))
    global_ = L.itc_loss_global(image, text, image, text, temperature=0.1, offset=0, image_ids=ids, all_image_ids=ids)
    assert float(global_) == pytest.approx(float(local), rel=1e-6)


def test_a_batch_with_several_captions_of_one_image_never_draws_them_as_negatives(tmp_path, monkeypatch):
    student = tiny_teacher().eval()
    batch = stack_batch(tiny_batches(2)[:6])
    batch["pixel_values"][1] = batch["pixel_values"][0]  # rows 0, 1, 2: three captions of one image
    batch["pixel_values"][2] = batch["pixel_values"][0]
    batch["image_ids"] = torch.tensor([5, 5, 5, 6, 7, 8])
    drawn = []
    original = L.build_itm_pairs

    def spy(neg_text, neg_image, size):
        drawn.append((neg_text.clone(), neg_image.clone()))
        return original(neg_text, neg_image, size)

    monkeypatch.setattr(L, "build_itm_pairs", spy)
    args = training_args(DistillationArguments, tmp_path)
    for seed in range(10):
        R.retrieval_losses(student, None, batch, args, None, generator=torch.Generator().manual_seed(seed))
    same = batch["image_ids"][:, None] == batch["image_ids"][None, :]
    rows = torch.arange(6)
    for neg_text, neg_image in drawn:
        assert not same[rows, neg_text].any() and not same[neg_image, rows].any()
    # the ITC term reads the ids. With pixel-identical copies of an image the soft targets give exactly the one-hot
    # loss (equal rows and columns average out); with two views of one image (augmentation, dropout) they differ
    itc = {}
    views = stack_batch(tiny_batches(2)[:6])["pixel_values"]
    for name, pixels in (("copies", batch["pixel_values"]), ("views", views)):
        for ids in ("with", "without"):
            inputs = {**batch, "pixel_values": pixels}
            if ids == "without":
                del inputs["image_ids"]
            parts = R.retrieval_losses(student, None, inputs, args, None, generator=torch.Generator().manual_seed(0))[1]
            itc[name, ids] = float(parts["itc"].detach())
    assert itc["copies", "with"] == pytest.approx(itc["copies", "without"], rel=1e-5)
    assert itc["views", "with"] != pytest.approx(itc["views", "without"], rel=1e-3)


def test_synthetic_groups_share_image_ids_and_twin_captions_are_false_on_each_other():
    dataset = SyntheticRetrievalDataset(seed=2, num_samples=200, image_size=32, twin_probability=1.0, max_captions=2,
                                        return_scene=True)
    items = list(dataset)
    assert len(items) == 200
    by_id: dict[int, list] = {}
    for item in items:
        by_id.setdefault(item["image_id"], []).append(item)
        assert statement_is_true(item["scene"], parse_statement(item["caption"]))
    assert any(len(group) == 2 for group in by_id.values())  # several captions of one image
    for image_id, group in by_id.items():
        assert len({item["scene"] for item in group}) == 1
        twin = by_id.get(image_id ^ 1)  # ids come in pairs: scene 2k, its twin 2k + 1
        if twin is not None:
            for item in group:
                assert not statement_is_true(twin[0]["scene"], parse_statement(item["caption"]))
    batch = RetrievalCollator(_FakeProcessor())([{k: v for k, v in i.items() if k != "scene"} for i in items[:8]])
    assert batch["image_ids"].tolist() == [i["image_id"] for i in items[:8]]


class _FakeProcessor:
    """Just enough of a processor for the collator: ids = word lengths, pixels = zeros."""

    class tokenizer:  # noqa: N801
        all_special_ids = [0]
        mask_token_id = 1

    def __call__(self, images=None, text=None, **kwargs):
        rows = [[len(w) + 2 for w in t.split()] for t in text]
        width = max(len(r) for r in rows)
        out = {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
               "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}
        if images is not None:
            out["pixel_values"] = torch.zeros(len(images), 3, 8, 8)
        return out


# --------------------------------------------------------------------------------------------- confidence intervals
def _ranks(seed: int, n_img: int = 40, per: int = 5, skill: float = 0.5) -> PerQueryRanks:
    rng = np.random.default_rng(seed)
    txt2img = np.repeat(np.arange(n_img), per)
    return PerQueryRanks(rng.geometric(skill, n_img) - 1, rng.geometric(skill, n_img * per) - 1, txt2img)


def test_bootstrap_r_mean_at_full_weights_is_the_metric():
    ranks = _ranks(0)
    img2txt = [list(range(i * 5, i * 5 + 5)) for i in range(40)]
    expected = recall_metrics(ranks.txt_ranks, ranks.img_ranks)["r_mean"]
    from efficientvlm.training.metrics.confidence import _r_means

    assert float(_r_means(ranks, np.ones((1, 40)))[0]) == pytest.approx(expected)
    lo, hi = r_mean_ci(ranks)
    assert lo < expected < hi and hi - lo < 40
    assert r_mean_ci(ranks) == r_mean_ci(ranks)  # seeded
    assert len(img2txt) == 40


def test_paired_difference_of_a_model_with_itself_is_exactly_zero_and_a_real_gap_is_found():
    a = _ranks(0)
    same = paired_r_mean_difference(a, a)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    better = PerQueryRanks(np.zeros_like(a.txt_ranks), np.zeros_like(a.img_ranks), a.txt2img)  # all hits
    d = paired_r_mean_difference(better, a)
    assert d["mean"] > 0 and d["ci95"][0] > 0
    with pytest.raises(ValueError, match="same retrieval set"):
        paired_r_mean_difference(a, _ranks(1, n_img=20))


# ----------------------------------------------------------------------------------------------- uniform baseline
def test_uniform_snap_cuts_every_layer_by_the_same_share():
    config = tiny_config()
    l0 = ModalL0Module(config, target_sparsity=0.4, modality_targets={"vision": 0.4, "text": 0.4, "fusion": 0.4})
    with torch.no_grad():  # a learned ranking that a global snap would turn into an uneven split
        for i, gate in enumerate(l0.gates.values()):
            gate.log_alpha.normal_(generator=torch.Generator().manual_seed(i))
    l0.snap_uniform_()
    masks = l0._gate_values(lambda gate, multiple=1: gate.deterministic(multiple=multiple))
    layers: dict = {}
    for g in l0.groups:
        kept, total = layers.get((g.modality, g.layer), (0.0, 0.0))
        layers[(g.modality, g.layer)] = (kept + float(masks[g.name].sum()) * g.unit_params,
                                         total + g.size * g.unit_params)
        if g.kind != "ffn":
            assert int(masks[g.name].sum()) == g.size - round(0.4 * g.size)
    for (modality, layer), (kept, total) in layers.items():
        ffn = next(g for g in l0.groups if g.modality == modality and g.layer == layer and g.kind == "ffn")
        assert abs((1 - kept / total) - 0.4) <= ffn.unit_params / total / 2 + 1e-9, (modality, layer)
    assert float(l0.achieved_sparsity()["params"]["total"]) == pytest.approx(0.4, abs=0.02)


def test_uniform_split_argument_holds_each_encoder_to_the_target(tmp_path):
    from efficientvlm.training.method.trainers import make_gated_model
    from efficientvlm.training.tasks import get_task
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

    student = EfficientVLMForImageTextRetrieval(tiny_config())
    args = training_args(PruningArguments, tmp_path, target_sparsity=0.3, uniform_split=True)
    gated = make_gated_model(student, args, get_task("retrieval"))
    assert gated.l0.modality_targets == {"vision": 0.3, "text": 0.3, "fusion": 0.3}
    assert "global" not in gated.l0.constraints


def test_a_batch_of_one_image_falls_back_to_its_captions_as_negatives(tmp_path):
    """Tiny batches can hold captions of a single image: no image-id negative exists, so the ids are set aside."""
    student = tiny_teacher().eval()
    batch = {**stack_batch(tiny_batches(1)[:3]), "image_ids": torch.tensor([4, 4, 4])}
    total, parts = R.retrieval_losses(student, None, batch, training_args(DistillationArguments, tmp_path), None,
                                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(total) and float(parts["itm"]) > 0


def test_seed_summary_means_spreads_and_paired_counts():
    from efficientvlm.training.commands.demo import format_seed_summary, summarize_seeds

    def report(seed, teacher, pruned, diff, ci):
        entry = lambda v: {"r_mean": v, "r_mean_ci95": [v - 1, v + 1], "twin_accuracy": 80.0,  # noqa: E731
                           "r_mean_fraction_of_teacher": v / teacher, "speedup": 2.0 + seed / 10, "params": 10}
        return {"protocol": {"task": "retrieval", "target_sparsity": 0.4, "seed": seed, "metric": "r_mean"},
                "eval_protocol": {"name": "twins"}, "models": {"teacher": entry(teacher), "pruned": entry(pruned)},
                "paired": {"pruned_kd_minus_no_kd": {"mean": diff, "ci95": ci}}}

    summary = summarize_seeds([report(0, 60.0, 58.0, 1.0, [0.2, 1.8]), report(1, 60.0, 55.0, -0.5, [-1.5, 0.5])])
    assert summary["models"]["pruned"]["mean"] == pytest.approx(56.5)
    assert summary["models"]["pruned"]["spread"] == pytest.approx(3.0)
    assert summary["models"]["pruned"]["speedup_range"] == [2.0, 2.1]
    assert summary["paired"]["pruned_kd_minus_no_kd"]["mean"] == pytest.approx(0.25)
    assert summary["paired"]["pruned_kd_minus_no_kd"]["seeds_excluding_zero"] == 1
    assert "| pruned | 58.0 / 55.0 | 56.5 | 3.0 |" in format_seed_summary(summary)
    with pytest.raises(ValueError, match="differ"):
        other = report(2, 60.0, 50.0, 0.0, [-1, 1])
        other["protocol"]["target_sparsity"] = 0.5
        summarize_seeds([report(0, 60.0, 58.0, 1.0, [0.2, 1.8]), other])
