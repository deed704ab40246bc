from setuptools import setup

setup(
    name="counterdb",
    version="0.1.0",
    description="A distributed database of increment-only counters (G-Counter CRDT) on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # twisted/plugins is a namespace shared with Twisted itself: no
    # __init__.py there, and it must be listed explicitly.
    packages=["counterdb", "twisted.plugins"],
    install_requires=["twisted>=23.10", "klein>=23.5", "treq>=23.11", "attrs>=22.2"],
    entry_points={
        "console_scripts": [
            "counterdb-admin = counterdb.admin:main",
            "counterdb-cluster = counterdb.cluster:main",
        ]
    },
    extras_require={
        "test": ["pytest>=7", "pytest-twisted>=1.14", "hypothesis>=6"],
    },
)
