"""X-VLM's box loss L_BBOX: GIoU / loss by hand, the box head, boxes in the data, JSON regions, the training step."""

import json
import random

import numpy as np

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from modeling_efficientvlm import (
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMModel,
)
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import tiny_config
from efficientvlm.training import DistillationArguments, EfficientVLMDistillationTrainer
from efficientvlm.training.data.collators import NO_BOX, RetrievalCollator, box_in_center_crop
from efficientvlm.training.data.files import load_albef_json
from efficientvlm.training.data.retrieval_dataset import SyntheticRetrievalDataset, make_retrieval_item
from efficientvlm.training.data.scene_render import object_box, render_scene
from efficientvlm.training.data.scene_world import Scene, random_scene
from efficientvlm.training.data.tokenization import synthetic_tokenizer
from efficientvlm.training.method import losses as L
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.tasks.retrieval import bbox_term, retrieval_losses
from efficientvlm.training.tasks import get_task


# ------------------------------------------------------------------------------------------------- losses by hand
def test_box_conversion_and_giou_by_hand():
    torch.testing.assert_close(L.box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]])),
                               torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 2.0, 3.0]])
    # row 0: intersection 1, union 4 + 4 − 1 = 7, hull 3·3 = 9 → 1/7 − (9 − 7)/9 = −5/63
    # row 1: disjoint, union 2, hull 3·1 = 3 → 0 − 1/3;  row 2: identical → 1
    torch.testing.assert_close(L.generalized_box_iou(a, b), torch.tensor([-5 / 63, -1 / 3, 1.0]))
    with pytest.raises(ValueError, match="boxes2 row 0 is degenerate"):
        L.generalized_box_iou(a[:1], torch.tensor([[1.0, 1.0, 0.5, 3.0]]))


def test_bbox_loss_by_hand_with_a_masked_row():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]], requires_grad=True)
    # row 1 has no box: its placeholder target (even a degenerate one) must not count
    target = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]])
    l1, giou = L.bbox_loss(pred, target, torch.tensor([True, False]))
    # L1 = |0.5 − 0.6| = 0.1 (one box); corners (0.4, 0.4, 0.6, 0.6) vs (0.5, 0.4, 0.7, 0.6): intersection 0.1·0.2,
    # union 0.04 + 0.04 − 0.02 = 0.06, hull 0.3·0.2 = 0.06 → GIoU = 1/3, loss 1 − 1/3 = 2/3
    torch.testing.assert_close(l1, torch.tensor(0.1))
    torch.testing.assert_close(giou, torch.tensor(2 / 3))
    (l1 + giou).backward()
    assert pred.grad[1].abs().sum() == 0 and pred.grad[0].abs().sum() > 0
    none_l1, none_giou = L.bbox_loss(pred, target, torch.tensor([False, False]))
    assert none_l1.item() == 0.0 and none_giou.item() == 0.0 and none_l1.requires_grad
    # unmasked: averaged over both boxes (X-VLM divides the sums by the number of boxes)
    l1_both, _ = L.bbox_loss(pred[:1].expand(2, 4), target[:1].expand(2, 4))
    torch.testing.assert_close(l1_both, torch.tensor(0.1))


# -------------------------------------------------------------------------------------------------------- model
def _model() -> EfficientVLMForPreTraining:
    torch.manual_seed(0)
    return EfficientVLMForPreTraining(tiny_config()).eval()


def test_box_head_shapes_range_and_image_token_path():
    model = _model()
    assert [type(m).__name__ for m in model.bbox_head] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert model.bbox_head[0].in_features == 24 and model.bbox_head[3].out_features == 4
    g = torch.Generator().manual_seed(0)
    pixels, ids = torch.randn(3, 3, 32, 32, generator=g), torch.randint(5, 99, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        boxes = model.predict_boxes(ids, mask, pixel_values=pixels)
        tokens = model.encode_image(pixels).last_hidden_state
        fused = model.fuse(model.encode_text(ids, mask).last_hidden_state, mask, tokens)
        expected = torch.sigmoid(model.bbox_head(fused.last_hidden_state[:, 0]))
        torch.testing.assert_close(model.predict_boxes(ids, mask, image_tokens=tokens), boxes)
    assert boxes.shape == (3, 4) and bool(((boxes > 0) & (boxes < 1)).all())
    torch.testing.assert_close(boxes, expected)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_tokens"):
        model.predict_boxes(ids, mask)


def test_checkpoint_without_box_head_loads_and_other_classes_drop_it_silently(tmp_path, capfd, caplog):
    model = _model()
    model.save_pretrained(tmp_path / "with")
    # an older pre-training checkpoint: the same weights without bbox_head
    model.save_pretrained(tmp_path / "without")
    state = load_file(tmp_path / "without" / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("bbox_head.")},
              tmp_path / "without" / "model.safetensors", metadata={"format": "pt"})
    loaded, info = EfficientVLMForPreTraining.from_pretrained(tmp_path / "without", output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("bbox_head.") for k in info["missing_keys"])
    source = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if not name.startswith("bbox_head."):
            torch.testing.assert_close(tensor, source[name], atol=0, rtol=0, msg=name)
    assert torch.isfinite(loaded.bbox_head[0].weight).all()
    captured = capfd.readouterr()  # the new box head is expected: no MISSING report (issue #34)
    assert "bbox_head" not in captured.out + captured.err + caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        for cls in (EfficientVLMForImageTextRetrieval, EfficientVLMModel, EfficientVLMForConditionalGeneration):
            _, info = cls.from_pretrained(tmp_path / "with", output_loading_info=True)
            assert not any(k.startswith("bbox_head.") for k in info["unexpected_keys"]), cls.__name__
    captured = capfd.readouterr()
    assert "bbox_head" not in captured.out + captured.err + caplog.text


# --------------------------------------------------------------------------------------------------------- data
def test_scene_boxes_hold_exactly_the_objects_pixels():
    rng = random.Random(3)
    size = 120
    for _ in range(6):
        for obj in random_scene(rng).objects:
            pixels = torch.from_numpy(np.array(render_scene(Scene((obj,)), size))).int()
            ys, xs = torch.nonzero((pixels != 255).any(-1), as_tuple=True)
            cx, cy, w, h = (v * size for v in object_box(obj))
            # every drawn pixel lies in the box, and the box is tight (rasteriser rounding: < 1.5 px)
            assert xs.min() >= cx - w / 2 - 1 and xs.max() <= cx + w / 2 + 1, obj
            assert ys.min() >= cy - h / 2 - 1 and ys.max() <= cy + h / 2 + 1, obj
            assert xs.min() <= cx - w / 2 + 1.5 and xs.max() >= cx + w / 2 - 1.5, obj
            assert ys.min() <= cy - h / 2 + 1.5 and ys.max() >= cy + h / 2 - 1.5, obj


def test_retrieval_items_carry_one_phrase_and_box_of_the_first_object():
    item = make_retrieval_item(random.Random(0), return_scene=True)
    obj = item["scene"].objects[0]
    assert item["region_phrases"] == [f"the {obj.size} {obj.color} {obj.shape}"]
    assert item["region_boxes"] == [list(object_box(obj))]
    assert all(0 < v <= 1 for v in item["region_boxes"][0])


@pytest.fixture(scope="module")
def processor():
    return EfficientVLMProcessor(build_image_processor(32), synthetic_tokenizer())


def _region_json(tmp_path, elems):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    records = [{"image": "wide.png", "caption": "a red car", "elems": elems},
               {"image": "wide.png", "caption": "nothing marked"}]
    path = tmp_path / "regions.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_json_regions_are_read_normalised_and_follow_the_centre_crop(tmp_path, processor):
    path = _region_json(tmp_path, [{"bb": [10, 5, 20, 10], "caption": ["circle", "square"], "attributes": "red"},
                                   {"bb": [0, 0, 4, 20], "caption": "left edge"}])
    rows = load_albef_json(path, str(tmp_path))
    assert rows[0]["region_phrases"] == ["red circle", "red square", "left edge"]
    # bb [x, y, w, h] in pixels of a 40 x 20 image → (cx, cy, w, h) = ((10 + 10)/40, (5 + 5)/20, 20/40, 10/20)
    assert rows[0]["region_boxes"][:2] == [[0.5, 0.5, 0.5, 0.5]] * 2
    assert rows[0]["region_boxes"][2] == pytest.approx([0.05, 0.5, 0.1, 1.0])
    assert rows[1]["region_phrases"] == [] and rows[1]["region_boxes"] == []
    # the processor keeps the centre 20 x 20 (x in [10, 30]): the 20-px-wide box fills it in x
    assert box_in_center_crop([0.5, 0.5, 0.5, 0.5], 40, 20) == pytest.approx((0.5, 0.5, 1.0, 0.5))
    assert box_in_center_crop([0.05, 0.5, 0.1, 1.0], 40, 20) is None  # cut off by the crop
    only_first = {**rows[0], "region_phrases": ["red circle"], "region_boxes": rows[0]["region_boxes"][:1]}
    cut_off = {**rows[0], "region_phrases": ["left edge"], "region_boxes": [rows[0]["region_boxes"][2]]}
    batch = RetrievalCollator(processor)([only_first, rows[1], cut_off])
    assert batch["has_box"].tolist() == [True, False, False]
    torch.testing.assert_close(batch["boxes"], torch.tensor([[0.5, 0.5, 1.0, 0.5], list(NO_BOX), list(NO_BOX)]))
    phrase = processor.tokenizer.decode(batch["box_input_ids"][0], skip_special_tokens=True)
    assert phrase == "red circle"
    plain = RetrievalCollator(processor)([{"image": rows[1]["image"], "caption": "a"}])
    assert "has_box" not in plain


@pytest.mark.parametrize("bb, message", [
    ([30, 5, 20, 10], r"'elems'\[0\]\.bb = \[30, 5, 20, 10\]: must be \[x, y, w, h\].*x \+ w <= 40 and y \+ h <= 20"),
    ([1, 2, 3], r"'elems'\[0\]\.bb"),
    ([1, 2, 0, 4], r"'elems'\[0\]\.bb = \[1, 2, 0, 4\]: .*w, h > 0"),
    ([True, 2, 3, 4], r"'elems'\[0\]\.bb"),
])
def test_malformed_region_boxes_name_file_record_field_and_range(tmp_path, bb, message):
    path = _region_json(tmp_path, [{"bb": bb, "caption": "car"}])
    with pytest.raises(ValueError, match=r"regions\.json: record 0 field " + message):
        load_albef_json(path, str(tmp_path))
    skipped = load_albef_json(path, str(tmp_path), on_error="skip")
    assert len(skipped) == 1 and "elems" in skipped.skipped[0]
    missing = _region_json(tmp_path, [{"bb": [1, 1, 2, 2]}])
    with pytest.raises(ValueError, match=r"record 0 field 'elems'\[0\] must be an object with 'bb' and 'caption'"):
        load_albef_json(missing, str(tmp_path))


# ------------------------------------------------------------------------------------------------ training step
def _batch(processor, n=4):
    return RetrievalCollator(processor, max_length=20)(list(SyntheticRetrievalDataset(seed=0, num_samples=n,
                                                                                      image_size=32)))


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                    save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                    dataloader_num_workers=0, use_mlm=False)
    defaults.update(kw)
    return DistillationArguments(**defaults)


def test_loss_step_adds_weighted_bbox_and_skips_without_boxes(tmp_path, processor):
    model = _model()
    batch = _batch(processor)
    assert batch["has_box"].all() and batch["boxes"].shape == (4, 4)
    _, parts = retrieval_losses(model, None, batch, _args(tmp_path, bbox_weight=0.5), None,
                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model.predict_boxes(batch["box_input_ids"], batch["box_attention_mask"],
                                   pixel_values=batch["pixel_values"])
    l1, giou = L.bbox_loss(pred, batch["boxes"])
    torch.testing.assert_close(parts["bbox"].detach(), 0.5 * (l1 + giou))
    torch.testing.assert_close(parts["total"].detach(), (parts["itc"] + parts["itm"] + parts["bbox"]).detach())
    # only the rows with a box are fused and averaged
    some = {**batch, "has_box": torch.tensor([True, False, True, False])}
    tokens = model.encode_image(batch["pixel_values"]).last_hidden_state
    l1, giou = L.bbox_loss(pred[[0, 2]], batch["boxes"][[0, 2]])
    torch.testing.assert_close(bbox_term(model, some, tokens).detach(), l1 + giou)
    generator = torch.Generator().manual_seed(0)
    for case, inputs, args, net in (
        ("weight 0", batch, _args(tmp_path, bbox_weight=0.0), model),
        ("no box fields", {k: v for k, v in batch.items() if not k.startswith(("box", "has_box"))}, _args(tmp_path),
         model),
        ("no row with a box", {**batch, "has_box": torch.zeros(4, dtype=torch.bool)}, _args(tmp_path), model),
        ("model without a box head", batch, _args(tmp_path), EfficientVLMForImageTextRetrieval(tiny_config())),
    ):
        _, parts = retrieval_losses(net, None, inputs, args, None, generator=generator)
        assert "bbox" not in parts and torch.isfinite(parts["total"]), case


def test_distilled_student_learns_boxes_from_ground_truth(tmp_path, processor):
    from efficientvlm.training import init_student_from_teacher

    teacher = _model()
    student = init_student_from_teacher(teacher, {"vision": 1, "text": 1, "fusion": 1})
    torch.testing.assert_close(student.bbox_head[3].weight, teacher.bbox_head[3].weight)  # copied like every head
    batch = _batch(processor)
    maps = layer_maps(student.config, teacher.config)
    _, parts = retrieval_losses(student, teacher, batch, _args(tmp_path), maps,
                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = student.predict_boxes(batch["box_input_ids"], batch["box_attention_mask"],
                                     pixel_values=batch["pixel_values"])
    torch.testing.assert_close(parts["bbox"].detach(), sum(L.bbox_loss(pred, batch["boxes"])))


def test_trainer_logs_loss_bbox(tmp_path, processor):
    args = _args(tmp_path, max_steps=2)
    train = SyntheticRetrievalDataset(seed=0, num_samples=8, image_size=32)
    trainer = EfficientVLMDistillationTrainer(model=_model().train(), args=args, train_dataset=train,
                                              data_collator=RetrievalCollator(processor), teacher_model=None,
                                              task=get_task("retrieval"))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss_itc" in entry]
    assert len(logged) == 2 and all(entry["loss_bbox"] > 0 for entry in logged)
