"""Inputs: tokenizers, chat template, bundled data sets."""
