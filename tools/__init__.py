"""Commands around the method, each `python -m tools.NAME`: the ablation of Table IV (ablation), the benchmarks
(bench, bench_parallel, measure), training curves (plot), the pictures of Fig. 3 and --explain (draw) and
predict.py's HTML gallery (gallery). Nothing here changes a number that train.py or eval.py computes."""
