"""Evaluation: the ImageCLEF metrics with the organisers' preprocessing, and submission files.

- :mod:`medcap.eval.imageclef` — caption preprocessing and each year's submission format
- :mod:`medcap.eval.metrics` — BERTScore and ROUGE-1 (pycocoevalcap contract) and :func:`evaluate`
- :mod:`medcap.eval.submission` — write a submission, check it with every rule of a year
"""
