from setuptools import setup

setup(
    name="glip-hf",
    version="0.1.0",
    description="GLIP (Grounded Language-Image Pre-training) for the Hugging Face ecosystem",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    # the bundled demo checkpoint (`glip-detect`'s default model) is installed as package data: modeling_glip/glip_demo
    packages=["modeling_glip", "processing", "modeling_glip.glip_demo"],
    package_dir={"modeling_glip.glip_demo": "checkpoints/glip-demo"},
    package_data={"modeling_glip.glip_demo": ["*.json", "*.safetensors", "*.md"]},
    python_requires=">=3.10",
    # Lower bounds only (see ../shared/docs/environment.md): install torch/torchvision first.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.23,<6",
        "timm>=1.0.20",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "pycocotools>=2.0.7",
        "pillow>=10",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    entry_points={"console_scripts": ["glip-detect=modeling_glip.cli:main", "glip-app=modeling_glip.app:main"]},
    extras_require={
        # the `glip-app` web page (gradio pins pillow < 13)
        "app": ["gradio>=6.0,<7"],
        # ONNX export (examples/export_onnx.py, torch.onnx.export(dynamo=True)) and ONNX Runtime; tested with these
        "export": ["onnx>=1.23.2", "onnxscript>=0.7.2", "onnxruntime>=1.32.0"],
        "dev": [
            "pytest>=7",
            "onnx>=1.23.2",
            "onnxscript>=0.7.2",
            "onnxruntime>=1.32.0",
            "pytest-timeout>=2",
            # `make test` runs the suite on two workers (-n 2): the many subprocess / import-bound tests overlap
            "pytest-xdist>=3.5",
            # the browser test of glip-app (tests/test_app.py) drives Debian's chromium + chromium-driver
            "selenium>=4.20",
            # real bert-base-uncased vocab + MiniLM weights, offline (installed --no-deps by the Makefile)
            "scikit-image>=0.21",
            # (the official LVIS API behind metrics/lvis_detection, lvis==0.5.3, is installed --no-deps by the Makefile:
            # its OpenCV / matplotlib requirements serve only its visualiser, which lvis_compat.py does without)
        ],
    },
)
