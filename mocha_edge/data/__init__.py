"""Datasets: readers (YOLO, COCO JSON, MOCHA layout), validation and the built-in benchmark."""

from mocha_edge.data.dataset import Dataset, Episode, ImageItem, Problem
from mocha_edge.data.readers import load_dataset

__all__ = ["Dataset", "Episode", "ImageItem", "Problem", "load_dataset"]
