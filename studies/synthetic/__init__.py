"""The C-DiffSET paper's claims measured on synthetic scenes, where the truth is known: report.py runs
the study and writes synthetic_report.md (and .json, two PNGs) here; measures.py holds the measures,
user_confidence.py the confidence maps as `cdiff translate --conf-dir` writes them, hallucination.py
the hallucination set and its counts, ablation_seeds.py the loss ablation's training runs,
markdown.py the text, reliability_plot.py the reliability diagram."""
