from setuptools import find_packages, setup

setup(
    name="olladmr",
    version="0.1.0",
    description="An event-driven, OpenAI-compatible proxy for Docker Model Runner servers (Twisted)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/olladmr_plugin.py"], "olladmr": ["ui/*.html", "ui/*.js", "ui/*.css"]},
    install_requires=[
        "twisted[tls]>=26.4.0,<27",  # >=26.4: TLS with pyOpenSSL 26 (25.5 breaks on it); <27: the suite is run on 26.4 and 26.10
        "treq>=24.9.1",
        "klein>=24.8.0",
        "pyyaml>=6.0",
        "service-identity>=24.1.0",
        "prometheus-client>=0.20.0",
        "httptools>=0.6.1",  # llhttp: the proxy path's upstream response parser (olladmr/proxy/wire.py)
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-twisted>=1.14.2",
            "openai>=1.40",
            "anthropic>=0.40",
            "ollama>=0.4",
            "hypothesis>=6.100",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "types-PyYAML",
            "playwright>=1.40",  # drives Debian's chromium (scripts/test.sh installs it); never downloads a browser
        ]
    },
    license="MIT",
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
