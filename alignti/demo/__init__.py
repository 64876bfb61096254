"""alignti.demo: `alignti demo`, the whole pipeline on the built-in shapes corpus.

`run.py` is the command (plans, stages), `tower.py` the vision-tower pretraining that stands in
for a pretrained SigLIP, `parallel.py` the process pool that runs several distillations at once
(also used by bench/paper_table.py), `saliency.py` the teacher-saliency measures and pictures,
`report.py` report.md / report.json. Only `cli.py`, bench/ and tests/ import this package.
"""
