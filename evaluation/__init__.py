"""Sample quality metrics: FID and KID with the standard TF Inception-v3, MNIST classifier metrics."""
from evaluation.classifier import ClassifierMetrics, MnistClassifier, classifier_metrics, load_classifier
from evaluation.fid import (
    KID_RESERVOIR_SIZE,
    FeatureSet,
    compare_feature_sets,
    image_feature_set,
    image_fid,
    read_images,
    reference_cache_path,
    reference_stats,
)
from evaluation.inception import FEATURE_DIM, InceptionFeatures, find_inception_weights
from evaluation.kid import FeatureReservoir, kid
from evaluation.statistics import FeatureStats, fid, frechet_distance

__all__ = [
    "ClassifierMetrics",
    "MnistClassifier",
    "classifier_metrics",
    "load_classifier",
    "KID_RESERVOIR_SIZE",
    "FeatureSet",
    "compare_feature_sets",
    "image_feature_set",
    "image_fid",
    "read_images",
    "reference_cache_path",
    "reference_stats",
    "FEATURE_DIM",
    "InceptionFeatures",
    "find_inception_weights",
    "FeatureReservoir",
    "kid",
    "FeatureStats",
    "fid",
    "frechet_distance",
]
