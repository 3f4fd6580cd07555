"""The opt-in testing module: helpers shared by warmstart's tests and benchmarks, never
imported by the runtime (loader, storage, imageformat, vllm_plugin, the Ray gateway).

  s3server      local S3-compatible servers (localbucket, nanio, moto) on free ports
  tlsfront      nginx terminating TLS in front of them, with a CA it generates
  faultproxy    an HTTP proxy that injects faults (status codes, resets, stalls, throttling)
  faultsources  the same as wrappers around any `Source` (failing ranges, short reads,
                throttle, latency)
  checkpoints   generated safetensors checkpoints
  netns         a multi-host test bed: hosts as network namespaces with rate-capped links,
                an S3 server and Ray (`ray start`) on them

Only the benchmark tools (`warmstart.benchmarks`, `warmstart.ray_serve.bench`) import it, and
tests/objstore/test_layer.py checks that nothing else does.
"""
