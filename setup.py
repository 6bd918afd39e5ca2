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
    # one command per tool of kim_plugins.cli (tools/*.py are the same entry points, mmseg-style)
    entry_points={
        "console_scripts": [
            "kim-atrous-rates=kim_plugins.cli.atrous_rates:main",
            "kim-benchmark=kim_plugins.cli.benchmark:main",
            "kim-benchmark-suite=kim_plugins.cli.benchmark_suite:main",
            "kim-cam=kim_plugins.cli.cam:main",
            "kim-check-dataset=kim_plugins.cli.check_dataset:main",
            "kim-check-vit-augmentation=kim_plugins.cli.check_vit_augmentation:main",
            "kim-config-matrix=kim_plugins.cli.config_matrix:main",
            "kim-convert-timm-resnet=kim_plugins.cli.convert_timm_resnet:main",
            "kim-dead-pixel-test=kim_plugins.cli.dead_pixel_test:main",
            "kim-erf=kim_plugins.cli.erf:main",
            "kim-list-plugins=kim_plugins.cli.list_plugins:main",
            "kim-robustness=kim_plugins.cli.robustness:main",
            "kim-summarize=kim_plugins.cli.summarize:main",
            "kim-test=kim_plugins.cli.test:main",
            "kim-train=kim_plugins.cli.train:main",
        ],
    },
    extras_require={
        # mmcv must be built with its ops (see tools/setup.sh); pip cannot express that.
        "mmseg": ["mmengine==0.10.7", "mmcv==2.1.0", "mmsegmentation==1.2.2", "ftfy", "regex"],
        "tools": ["matplotlib", "scipy", "tqdm"],
        "test": ["pytest>=7"],
    },
)
