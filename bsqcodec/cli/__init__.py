"""The `bsqc` command line (`cli.cli:main`): thin commands over the library, with lazy imports so that
--help, --version, info and presets never import torch. Nothing in the library imports this package.
"""
