"""Few-step translation measured against DDIM-50 on the demo model's held-out synthetic scenes: a distilled
student (cdiff distill), training-free step caching (DeepCache), DDIM and DPM-Solver++(2M) at fewer steps.

    python -m studies.fewstep            # the table (fewstep.md, .json) and the plot (fewstep.png), here
    python -m studies.fewstep.pilots     # the pilot runs that chose the distillation method and the map

measures.py holds the measures (the blur check, the confidence AUROC), arms.py what each row runs,
report.py the run and its table, plot.py the PNG.
"""
