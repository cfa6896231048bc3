"""Commands around the method, each `python -m tools.NAME`: the paper's Fig. 3 (figure3), the ZSL twins label by
label (twins), the ablation of Table IV (ablation), the benchmarks (bench, bench_parallel, measure), training curves
(plot), predict.py's HTML gallery and explain maps (gallery, explain). Nothing here changes a number that train.py
or eval.py computes, and no chapter imports this folder."""
