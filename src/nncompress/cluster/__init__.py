"""Weight sharing by clustering (Deep Compression): k-means codebooks, trainable centroids, Huffman sizes.

>>> import torch.nn as nn, nncompress
>>> model = nncompress.apply(nn.Sequential(nn.Linear(32, 16)), ClusterConfig(bits=3))
>>> isinstance(model[0], ClusteredLayer), int(model[0].shared_weight().unique().numel()) <= 8
(True, True)
"""
from .clustered import ClusteredLayer, assignment_from_values
from .kmeans import cluster_weight, huffman_bits, huffman_lengths, index_bits, init_centroids, kmeans_1d
from .stage import ClusterConfig, layer_cost

__all__ = ["ClusterConfig", "ClusteredLayer", "assignment_from_values", "cluster_weight", "huffman_bits",
           "huffman_lengths", "index_bits", "init_centroids", "kmeans_1d", "layer_cost"]
