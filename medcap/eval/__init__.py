"""Evaluation: the ImageCLEF metrics with the organisers' preprocessing, submission files, tables and the report.

- :mod:`medcap.eval.stage` — the evaluate and submit stages (scores keyed on the caption set they score)
- :mod:`medcap.eval.imageclef` — caption preprocessing and each year's submission format
- :mod:`medcap.eval.metrics`, :mod:`~medcap.eval.text_metrics`, :mod:`~medcap.eval.clip_metrics` — the metrics
- :mod:`medcap.eval.bertscore` — one BERTScore model per run, any caption x reference block
- :mod:`medcap.eval.specificity` — specificity, own-reference rank, distinct captions
- :mod:`medcap.eval.factuality` — AlignScore and the MedCAT concept F1 through their packages
- :mod:`medcap.eval.suite_specs`, :mod:`~medcap.eval.suites` — each year's metric set, means and intervals
- :mod:`medcap.eval.submission`, :mod:`~medcap.eval.submission_check` — write a submission; check it with every rule
- :mod:`medcap.eval.ablation`, :mod:`~medcap.eval.report` — ablation tables and forest plots; the HTML report
"""
