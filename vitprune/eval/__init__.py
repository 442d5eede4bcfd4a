"""Evaluation: real-image loading, accuracy, GMACs, throughput and latency."""

from ..data import ImageFolder, load_images, make_loader
from ..ir.flops import gmacs
from .metrics import evaluate
from .speed import latency, throughput

__all__ = ["ImageFolder", "load_images", "make_loader", "gmacs", "evaluate", "latency", "throughput"]
