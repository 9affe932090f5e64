"""Corpus BLEU-1..4 of generated captions as in the COCO caption toolkit, as a local `evaluate` metric.

Load it by path, no Hub access: `evaluate.load("<efficientvlm.training.metrics>/bleu")`. The computation is
`efficientvlm.training.metrics.caption_scores.bleu` (pycocoevalcap's BleuScorer, option "closest", PTB-style tokenization
in pure Python), so scripts using this module and the captioning task's evaluation agree exactly.
"""

import datasets
import evaluate


def _import_bleu():
    """`efficientvlm.training.metrics.caption_scores.bleu`: the metric is the package's own function.

    `evaluate.load` runs a copy of this file from its modules cache, so the computation is imported from the installed
    package (`pip install efficientvlm[train]`), never from a path next to this file.
    """
    try:
        from efficientvlm.training.metrics.caption_scores import bleu
    except ImportError as error:
        raise ImportError("the caption BLEU metric computes with efficientvlm's `efficientvlm.training` package: "
                          "`pip install 'efficientvlm[train]'` first") from error
    return bleu


_DESCRIPTION = """\
Corpus BLEU-1..4 of image captions exactly as the COCO caption evaluation toolkit (pycocoevalcap `Bleu(4)`): captions
lower-cased and PTB-tokenized with punctuation removed, n-gram counts clipped by each image's references, the brevity
penalty from the corpus lengths with each image's closest reference length, the toolkit's 1e-15 / 1e-9 smoothing.
Scores are on the toolkit's 0..1 scale (papers report ×100).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one generated caption (string) per image.
    references: per image, a list of its reference captions (at least one).
    max_order (optional): the highest n-gram order, default 4.
Returns:
    bleu_1 ... bleu_<max_order>: floats in [0, 1].
Example:
    >>> metric = evaluate.load(path_to_this_folder)
    >>> round(metric.compute(predictions=["a dog runs on the grass"],
    ...                      references=[["A dog runs on the grass.", "a brown dog running"]])["bleu_4"], 6)
    1.0
"""

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL}, year={2002}
}
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv:1504.00325}, year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    """Caption BLEU metric; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references, max_order: int = 4) -> dict:
        scores = _import_bleu()(list(predictions), [list(refs) for refs in references], n=max_order)
        return {f"bleu_{k + 1}": score for k, score in enumerate(scores)}
