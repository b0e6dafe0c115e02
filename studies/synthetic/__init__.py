"""The C-DiffSET paper's claims measured on synthetic scenes, where the truth is known: report.py runs
the study and writes synthetic_report.md (and .json, two PNGs) here; measures.py holds the measures,
markdown.py the text, reliability_plot.py the reliability diagram."""
