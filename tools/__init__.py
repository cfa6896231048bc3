"""Commands around the method, each `python -m tools.NAME`: the ablation of Table IV (ablation), the benchmarks
(bench, bench_parallel, measure), training curves (plot) and the pictures of Fig. 3 and --explain (draw).
Nothing here changes a number that train.py or eval.py computes."""
