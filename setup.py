from setuptools import setup

setup(
    name="glip-hf",
    version="0.1.0",
    description="GLIP (Grounded Language-Image Pre-training) for the Hugging Face ecosystem",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["modeling_glip", "processing"],
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
        "dev": [
            "pytest>=7",
            "pytest-timeout>=2",
            # the browser test of glip-app (tests/test_app.py) drives Debian's chromium + chromium-driver
            "selenium>=4.20",
            # real bert-base-uncased vocab + MiniLM weights, offline (installed --no-deps by the Makefile)
            "scikit-image>=0.21",
            # the official LVIS API behind metrics/lvis_detection (tests/test_lvis_metric.py); its OpenCV / matplotlib
            # requirements serve only its visualiser (metrics/lvis_detection/lvis_compat.py works without them)
            "lvis==0.5.3",
        ],
    },
)
