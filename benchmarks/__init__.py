"""Benchmarks: `warmstart bench` (harness) and the image benchmark (image_bench).

Layers of the loader harness, data flowing one way:
  harness   CLI, checkpoint and S3 server set-up, scenarios, page-cache state, repeats
  peer      one timed load in its own process (peers: one function per loader under test)
  verify    materialize (every byte resident) and the digest checked against the files
  ceilings  fio / raw ranged GETs / pinned cudaMemcpy, measured in the same run
  report    medians, ratios, results.json, results.md, plots; machine: machine facts
"""
