"""kim_plugins: Bum Jun Kim and Sang Woo Kim's methods as timm and mmsegmentation plugins."""
from setuptools import find_packages, setup

setup(
    name="kim_plugins",
    version="0.1.0",
    description=(
        "Scale equalizers, resolution-aware atrous rates, Gaussian attention bias, "
        "PreLayerNorm and stochastic average pooling for timm and mmsegmentation 1.x"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["kim_plugins", "kim_plugins.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.0",
        "timm>=1.0.24",
    ],
    extras_require={
        # mmcv must be built with its ops (see tools/setup.sh); pip cannot express that.
        "mmseg": ["mmengine==0.10.7", "mmcv==2.1.0", "mmsegmentation==1.2.2", "ftfy", "regex"],
        "tools": ["matplotlib", "scipy", "tqdm"],
        "test": ["pytest>=7"],
    },
)
