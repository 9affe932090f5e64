"""The one FLOPs model (`training.method.cost`) gives the numbers the two former models gave (issue #32 item 3).

The pins below were computed with the former `structure.encoder_flops` / `retrieval_flops` / `vqa_flops`, the per-unit
`cost.prunable_flops` and `bench._flops` before they were merged, for the tiny teacher, its student and a
heterogeneously pruned config (removed sub-layers in every encoder) on every task's path.
"""

import copy

import pytest

from efficientvlm.training.method.cost import (
    Run, captioning_path, encoder_flops, nlvr2_flops, nlvr2_path, path_flops, prunable_flops, retrieval_flops,
    retrieval_path, vqa_flops, vqa_path, captioning_flops,
)
from efficientvlm.training.method.student import student_config
from modeling_efficientvlm.configuration_efficientvlm import decoder_config_from_fusion
from tests.conftest import ragged_config, tiny_config

PINNED = {
    "teacher": {
        "retrieval": {"vision": 2130432, "text": 618240, "itc": 7392, "fusion": 4571136, "total": 7327200},
        "retrieval_64px": {"vision": 10646016, "text": 618240, "itc": 7392, "fusion": 10321920, "total": 21593568},
        "vqa": {"vision": 2130432, "text": 370944, "fusion": 849600, "decoder": 2402352, "total": 5753328},
        "vqa_64px": {"vision": 10646016, "text": 370944, "fusion": 1927872, "decoder": 1070064, "total": 14014896},
        "encoders": {"vision": 710144, "text": 123648, "fusion": 283200, "decoder": 124416},
        "paths": {"retrieval": {"vision": 1540608, "text": 618240, "fusion": 4531200, "total": 6690048}, "nlvr2": {"vision": 4108288, "text": 649728, "fusion": 2701824, "total": 7459840}, "captioning": {"vision": 1027072, "text": 1054080, "fusion": 5286528, "total": 7367680}, "vqa": {"vision": 1540608, "text": 370944, "fusion": 849600, "decoder": 2030400, "total": 4791552}},
    },
    "student": {
        "retrieval": {"vision": 1360128, "text": 309120, "itc": 7392, "fusion": 2305536, "total": 3982176},
        "retrieval_64px": {"vision": 6502656, "text": 309120, "itc": 7392, "fusion": 5180928, "total": 12000096},
        "vqa": {"vision": 1360128, "text": 185472, "fusion": 424800, "decoder": 1387152, "total": 3357552},
        "vqa_64px": {"vision": 6502656, "text": 185472, "fusion": 963936, "decoder": 614736, "total": 8266800},
        "encoders": {"vision": 453376, "text": 61824, "fusion": 141600, "decoder": 62208},
        "paths": {"retrieval": {"vision": 770304, "text": 309120, "fusion": 2265600, "total": 3345024}, "nlvr2": {"vision": 2054144, "text": 324864, "fusion": 1350912, "total": 3729920}, "captioning": {"vision": 513536, "text": 527040, "fusion": 2643264, "total": 3683840}, "vqa": {"vision": 770304, "text": 185472, "fusion": 424800, "decoder": 1015200, "total": 2395776}},
    },
    "ragged": {
        "retrieval": {"vision": 1123488, "text": 233520, "itc": 7392, "fusion": 1854720, "total": 3219120},
        "retrieval_64px": {"vision": 5298336, "text": 233520, "itc": 7392, "fusion": 4011264, "total": 9550512},
        "vqa": {"vision": 1123488, "text": 140112, "fusion": 340272, "decoder": 1188864, "total": 2792736},
        "vqa_64px": {"vision": 5298336, "text": 140112, "fusion": 744624, "decoder": 524448, "total": 6707520},
        "encoders": {"vision": 374496, "text": 46704, "fusion": 113424, "decoder": 50208},
        "paths": {"retrieval": {"vision": 533664, "text": 233520, "fusion": 1814784, "total": 2581968}, "nlvr2": {"vision": 1423104, "text": 243648, "fusion": 1094400, "total": 2761152}, "captioning": {"vision": 355776, "text": 398880, "fusion": 2042928, "total": 2797584}, "vqa": {"vision": 533664, "text": 140112, "fusion": 340272, "decoder": 816912, "total": 1830960}},
    },
}
"""Former FLOPs of: retrieval (3 images, 5 texts, 7 tokens, k 2; also at 64 px), VQA (3 questions of 7 tokens, 5
re-scored answers of 4 tokens; at 64 px only 2 answers), one pass per encoder, and the units on every task's path."""

BENCH_PINNED = {
    "tiny": {
        "teacher": {"retrieval": 176855040, "vision": 11669504, "text": 13762560, "fusion": 151126016},
        "student": {"retrieval": 89362432, "vision": 6621184, "text": 6881280, "fusion": 75563008},
        "pruned": {"retrieval": 67489280, "vision": 5359104, "text": 5160960, "fusion": 56672256},
    },
    "xvlm-clip": {
        "teacher": {"retrieval": 751912288256, "vision": 281008963584, "text": 27415019520, "fusion": 443330592768},
        "student": {"retrieval": 376959844352, "vision": 141429325824, "text": 13707509760, "fusion": 221665296384},
        "pruned": {"retrieval": 283221733376, "vision": 106534416384, "text": 10280632320, "fusion": 166248972288},
    },
}
"""Former `bench._flops` of the presets' teacher / student / pruned at bench's defaults (8 images, 8 texts, 40 tokens,
k 4): the retrieval path and each encoder alone."""


def _configs():
    teacher = tiny_config()
    return {"teacher": teacher, "student": student_config(teacher), "ragged": ragged_config()}


def _with_decoder(config):
    config = copy.deepcopy(config)
    config.decoder_config = decoder_config_from_fusion(config)
    return config


@pytest.mark.parametrize("name", sorted(PINNED))
def test_unified_flops_equal_the_former_models(name):
    config, pins = _configs()[name], PINNED[name]
    vqa = _with_decoder(config)
    tokens = 1 + (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    at_64 = 1 + (64 // config.vision_config.patch_size) ** 2
    assert retrieval_flops(config, images=3, texts=5, text_length=7, k=2) == pins["retrieval"]
    assert retrieval_flops(config, images=3, texts=5, text_length=7, k=2, image_tokens=at_64) == pins["retrieval_64px"]
    assert vqa_flops(vqa, questions=3, question_length=7, k=5, answer_length=4) == pins["vqa"]
    assert vqa_flops(vqa, questions=3, question_length=7, k=2, answer_length=4, image_tokens=at_64) == pins["vqa_64px"]
    one = {"vision": [Run(1, tokens, tokens)], "text": [Run(1, 7, 7)], "fusion": [Run(1, 7, 7, tokens)]}
    encoders = {m: encoder_flops(config, m, runs) for m, runs in one.items()}
    encoders["decoder"] = encoder_flops(vqa, "decoder", [Run(1, 4, 4, 7)])
    assert encoders == pins["encoders"]
    paths = {
        "retrieval": prunable_flops(config, retrieval_path(config, images=3, texts=5, text_length=7, k=2)),
        "nlvr2": prunable_flops(config, nlvr2_path(config, items=4, text_length=9)),
        "captioning": prunable_flops(config, captioning_path(config, images=2, prompt_length=5, new_tokens=6, beams=3)),
        "vqa": prunable_flops(vqa, vqa_path(vqa, questions=3, question_length=7, k=5, answer_length=4)),
    }
    assert paths == pins["paths"]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_task_total_is_its_path_plus_its_heads(name):
    """The path FLOPs (units + patch embedding) of every task's path, plus heads that only add: one per-unit model."""
    config = _configs()[name]
    vqa = _with_decoder(config)
    retrieval = dict(images=3, texts=5, text_length=7, k=2)
    nlvr2 = dict(items=4, text_length=9)
    vqa_sizes = dict(questions=3, question_length=7, k=5, answer_length=4)
    captioning = dict(images=2, prompt_length=5, new_tokens=6, beams=3)
    cases = [
        (retrieval_flops(config, **retrieval), path_flops(config, retrieval_path(config, **retrieval))),
        (nlvr2_flops(config, **nlvr2), path_flops(config, nlvr2_path(config, **nlvr2))),
        (vqa_flops(vqa, **vqa_sizes), path_flops(vqa, vqa_path(vqa, **vqa_sizes))),
        (captioning_flops(config, **captioning), path_flops(config, captioning_path(config, **captioning))),
    ]
    for total, path in cases:
        assert total["vision"] == path["vision"] and total["text"] == path["text"]
        assert total["total"] > path["total"]
    # units + the patch embedding: the vision entry exceeds the units alone by the patch matmul of every image
    v = config.vision_config
    patches = 3 * (v.image_size // v.patch_size) ** 2
    units = prunable_flops(config, retrieval_path(config, images=3, texts=5, text_length=7, k=2))["vision"]
    path = retrieval_path(config, images=3, texts=5, text_length=7, k=2)
    assert path_flops(config, path)["vision"] == units + 2 * patches * (
        v.num_channels * v.patch_size**2 * v.hidden_size)


@pytest.mark.parametrize("preset", sorted(BENCH_PINNED))
def test_bench_flops_equal_the_former_bench(preset):
    from efficientvlm.training.commands.bench import BenchArguments, bench_flops, preset_models_configs
    from efficientvlm.training.tasks import get_task

    args = BenchArguments(preset=preset)
    for name, config in preset_models_configs(args).items():
        flops = bench_flops(get_task("retrieval"), config, args)
        flops["retrieval"] = flops.pop("path")  # the former bench named the path workload after its only task
        assert flops == BENCH_PINNED[preset][name], name


def test_cached_image_kv_engine_prices_the_cross_attention_kv_once_per_image():
    """Retrieval re-ranking with `reuse_image_kv` projects each image's tokens to cross-attention keys / values once
    per fusion layer, not once per (image, text) pair: by hand on the ragged config (cross heads [0, 3] of width 6,
    reading 32-wide vision tokens, 1 + 4² = 17 of them), 3 images, 5 texts, k 2 → 16 pairs, 3 projections."""
    from efficientvlm.training.method.cost import path_from_json, path_to_json

    config = ragged_config()
    sizes = dict(images=3, texts=5, text_length=7, k=2)
    reference, cached = retrieval_flops(config, **sizes), retrieval_flops(config, **sizes, reuse_image_kv=True)
    assert reference == PINNED["ragged"]["retrieval"]  # the default stays the per-pair (official) engine
    heads, hd, kv_size, tokens, pairs, images = 0 + 3, 6, 32, 17, 16, 3
    saved = heads * 2 * 2 * (pairs - images) * tokens * kv_size * hd  # 2 FLOPs per MAC, K and V
    assert reference["fusion"] - cached["fusion"] == saved == 509184
    assert reference["total"] - cached["total"] == saved
    assert {m: cached[m] for m in ("vision", "text", "itc")} == {m: reference[m] for m in ("vision", "text", "itc")}
    path = retrieval_path(config, **sizes, reuse_image_kv=True)
    assert path["fusion"] == [Run(16, 7, 7, 17, 3)]
    assert path_from_json(path_to_json(path)) == path  # the fifth entry survives gate metadata
    assert path_to_json(retrieval_path(config, **sizes))["fusion"] == [[16, 7, 7, 17]]
