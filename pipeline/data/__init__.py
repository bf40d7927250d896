"""The data: the competition's file format and score, training patches, folds, degradation, external data.

competition (the organiser's zips and their members), scoring (a submission's SSIM), patches
(scenes in memory, paired crops, augmentation), folds (balanced folds, groups kept whole),
degradation (the downscaling kernels and the probe), extra (external training images).
"""
