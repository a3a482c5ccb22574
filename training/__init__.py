"""Datasets (synthetic gaskets, PASCAL VOC), training, evaluation and export."""
