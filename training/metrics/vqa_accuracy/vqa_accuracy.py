"""VQA accuracy exactly as the official VQA evaluation script (`vqaEval.py`) computes it, as a local `evaluate` metric.

Load it by path, no Hub access: `evaluate.load("<efficientvlm.training.metrics>/vqa_accuracy")`. The computation is
`efficientvlm.training.metrics.vqa_scores.vqa_accuracy`, so scripts using this module and the VQA task's evaluation agree.
"""

import datasets
import evaluate


def _import_vqa_accuracy():
    """`efficientvlm.training.metrics.vqa_scores.vqa_accuracy`: the metric is the package's own function.

    `evaluate.load` runs a copy of this file from its modules cache, so the computation is imported from the installed
    package (`pip install efficientvlm[train]`), never from a path next to this file.
    """
    try:
        from efficientvlm.training.metrics.vqa_scores import vqa_accuracy
    except ImportError as error:
        raise ImportError("the VQA accuracy metric computes with efficientvlm's `efficientvlm.training` package: "
                          "`pip install 'efficientvlm[train]'` first") from error
    return vqa_accuracy


_DESCRIPTION = """\
VQA accuracy of predicted answers against the annotators' answers, equal to the official VQA evaluation script
(vqaEval.py) on every question: per question the mean over the annotators of min(#other annotators whose answer equals
the prediction / 3, 1) (10 annotators: 1 / 2 / 3 matching score 0.3 / 0.6 / 0.9), answers normalised (punctuation,
number words to digits, articles, contractions) only when the annotators disagree, as the script does.
`variant="corrected"` always normalises (and uses a contraction table that can match); not the reported number.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted answer (string) per question.
    references: per question, the list of its annotator answers (VQA v2: 10).
    variant (optional): "official" (default) or "corrected".
Returns:
    accuracy: float in [0, 1].
Example:
    >>> metric = evaluate.load(path_to_this_folder)
    >>> metric.compute(predictions=["two"], references=[["2", "2", "3"]])["accuracy"]
    0.4444444444444444
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV}, year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """VQA accuracy metric; see the module docstring."""

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

    def _compute(self, predictions, references, variant: str = "official") -> dict:
        score = _import_vqa_accuracy()(list(predictions), [list(refs) for refs in references], variant)
        return {"accuracy": score}
